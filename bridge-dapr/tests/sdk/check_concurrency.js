// Drives a Dapr sidecar with Dapr's official JavaScript SDK (npm `@dapr/dapr`) to check app
// concurrency as Dapr documents it (docs "App concurrency": `--app-max-concurrency` /
// `appMaxConcurrency` is the largest number of requests the sidecar has open to the app at
// once, pub/sub deliveries included): an SDK `DaprServer` app holds each delivery for a while
// and counts how many it has open; an SDK `DaprClient` publishes a burst of four times that
// many. The app must see every event, never more than MAX deliveries at once, and MAX at once
// while the burst lasts (the sidecar does use what it may).
//
//     node check_concurrency.js SIDECAR_URL APP_PORT MAX
//
// The sidecar must already be pointed at APP_PORT and run with app concurrency MAX. Prints one
// `PASS <check>` line per check and exits 0, or `FAIL <check>: <why>` and exits 1.

const { DaprClient, DaprServer, DaprPubSubStatusEnum, LogLevel } = require('@dapr/dapr');

const [sidecarUrl, appPort, maxArg] = process.argv.slice(2);
const max = Number(maxArg);
const { hostname: daprHost, port: daprPort } = new URL(sidecarUrl);
const pubsub = 'pubsub';
const run = Math.random().toString(36).slice(2, 10);
const topic = `work-${run}`;
const events = 4 * max;
const holdMs = 150;
const logger = { level: LogLevel.Error };

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const server = new DaprServer({
  serverHost: '127.0.0.1',
  serverPort: appPort,
  clientOptions: { daprHost, daprPort, logger },
  logger,
});
const client = new DaprClient({ daprHost, daprPort, logger });

let open = 0;
let mostOpen = 0;
const seen = new Set();

async function main() {
  await server.pubsub.subscribe(pubsub, topic, async (data) => {
    open += 1;
    mostOpen = Math.max(mostOpen, open);
    await sleep(holdMs);
    seen.add(data.n);
    open -= 1;
    return DaprPubSubStatusEnum.SUCCESS;
  });
  await server.start();
  // The sidecar reads the app's subscriptions once the app answers: wait until it lists them.
  const listed = Date.now() + 5000;
  for (;;) {
    const meta = await client.metadata.get();
    if ((meta.subscriptions || []).some((s) => s.topic === topic)) break;
    if (Date.now() > listed) throw new Error('the sidecar never listed the subscription');
    await sleep(20);
  }
  for (let n = 0; n < events; n += 1) {
    const r = await client.pubsub.publish(pubsub, topic, { n });
    if (r.error) throw new Error(`publish ${n}: ${r.error}`);
  }
  const deadline = Date.now() + 20000;
  while (seen.size < events && Date.now() < deadline) await sleep(20);

  let failed = false;
  const check = (name, ok, why) => {
    if (failed) return;
    if (ok) {
      console.log(`PASS ${name}`);
    } else {
      console.log(`FAIL ${name}: ${why}`);
      failed = true;
    }
  };
  check('every event of the burst reaches the app', seen.size === events, `${seen.size} of ${events}`);
  check(`the app never has more than ${max} deliveries open at once`, mostOpen <= max, `${mostOpen} at once`);
  check(`the sidecar uses its ${max} (the burst had ${max} open at once)`, mostOpen === max, `at most ${mostOpen} at once`);
  console.log(`INFO most deliveries open at once: ${mostOpen} of ${max}; ${seen.size} events`);
  await server.stop();
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAIL setup: ${e.stack || e}`);
  process.exit(1);
});
