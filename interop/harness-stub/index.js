// Stand-in for @purista/harness (absent from the npm registry). @purista/core imports these four
// names from its agent-queue module only; the interop test never runs an agent, so every use
// fails loudly instead of pretending to work.
const missing = (name) => new Error(`@purista/harness is not installed (stand-in): ${name}`)
export class ModelError extends Error {}
export class ModelCapabilityError extends ModelError {}
export function defineHarness() {
  throw missing('defineHarness')
}
export class InMemoryStateStore {
  constructor() {
    throw missing('InMemoryStateStore')
  }
}
