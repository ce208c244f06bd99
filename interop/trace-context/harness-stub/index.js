// Stand-in for @purista/harness (used only by @purista/core's agent builders, not served here).
export class InMemoryStateStore {}
export class ModelCapabilityError extends Error {}
export class ModelError extends Error {}
export function defineHarness() { throw new Error('@purista/harness stand-in: agents are not available') }
