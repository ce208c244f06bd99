// Drives a Dapr sidecar with Dapr's official JavaScript SDK (npm `@dapr/dapr`): an SDK
// `DaprServer` app subscribes with routing rules and a dead-letter topic and serves a method;
// an SDK `DaprClient` publishes, invokes and keeps state. Checks what Dapr's documentation
// says happens:
//
// * pub/sub routing (docs "How-To: Route messages to different event handlers"): the rules are
//   CEL over the CloudEvent (`event.type`, `event.data.*`), tried in order, the first match
//   wins, otherwise `routes.default`; without a default, an event that matches no rule is not
//   delivered;
// * the app's `{"status": "RETRY"}` has the sidecar deliver again per the resiliency policy,
//   after which the event goes to the subscription's `deadLetterTopic` (docs "Dead Letter
//   Topics"), where a subscription of the app receives it;
// * service invocation returns the app's reply; an unknown app id is an error;
// * state: saved values read back, a missing key is empty, a wrong ETag is 409;
// * tokens (docs "Authenticate requests from Dapr using token authentication" and "Enable API
//   token authentication"): without `dapr-api-token` the sidecar answers 401; the sidecar sends
//   the app's token with every call it makes to the app.
//
//     node check_double.js SIDECAR_URL APP_PORT DAPR_API_TOKEN APP_API_TOKEN RETRIES
//
// The sidecar must already be pointed at APP_PORT with APP_API_TOKEN, and its resiliency policy
// must retry inbound deliveries RETRIES times. Prints one `PASS <check>` line per check and
// exits 0, or `FAIL <check>: <why>` and exits 1. Written against Dapr's documented behaviour,
// not the double's code: a real daprd must pass it the same way.

const express = require('express');
const { DaprClient, DaprServer, DaprPubSubStatusEnum, HttpMethod, LogLevel } = require('@dapr/dapr');

const [sidecarUrl, appPort, apiToken, appToken, retriesArg] = process.argv.slice(2);
const retries = Number(retriesArg);
const { hostname: daprHost, port: daprPort } = new URL(sidecarUrl);
const appId = 'sdk-app';
const pubsub = 'pubsub';
const store = 'statestore';
const run = Math.random().toString(36).slice(2, 10);
const topic = `orders-${run}`;
const deadTopic = `orders-dead-${run}`;
const auditTopic = `audit-${run}`;
const logger = { level: LogLevel.Error };

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function assert(ok, why) {
  if (!ok) throw new Error(why);
}

async function until(what, predicate, ms = 5000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await sleep(20);
  }
  throw new Error(`timed out waiting for ${what}`);
}

// What the app received, by route.
const received = { widgets: [], urgent: [], products: [], poison: [], dead: [], audit: [] };
// Requests from the sidecar to the app, and those without the app's token.
let appRequests = 0;
const untokened = [];

const app = express();
app.use((req, res, next) => {
  appRequests += 1;
  if (req.headers['dapr-api-token'] !== appToken) {
    untokened.push(`${req.method} ${req.path}`);
    res.status(401).end();
    return;
  }
  next();
});

const server = new DaprServer({
  serverHost: '127.0.0.1',
  serverPort: appPort,
  serverHttp: app,
  clientOptions: { daprHost, daprPort, daprApiToken: apiToken, logger },
  logger,
});
const client = new DaprClient({ daprHost, daprPort, daprApiToken: apiToken, logger });

const checks = [];
function check(name, body) {
  checks.push([name, body]);
}

check('the sidecar lists the app\'s subscriptions with their rules and dead-letter topic', async () => {
  let subs = [];
  await until('the subscriptions in the metadata', async () => {
    const meta = await client.metadata.get();
    subs = (meta.subscriptions || []).filter((s) => [topic, deadTopic, auditTopic].includes(s.topic));
    return subs.length === 3;
  });
  const orders = subs.find((s) => s.topic === topic);
  assert(orders.deadLetterTopic === deadTopic, `deadLetterTopic ${orders.deadLetterTopic}`);
  const matches = orders.rules.map((r) => r.match);
  assert(matches.length === 4 && matches[0] === 'event.type == "widget"', `rules ${JSON.stringify(orders.rules)}`);
});

check('the first matching CEL rule routes an event (event.type, then event.data fields)', async () => {
  // A structured CloudEvent whose type is "widget", and whose data would also match the second rule.
  const widget = { specversion: '1.0', id: `w-${run}`, source: 'sdk', type: 'widget', datacontenttype: 'application/json', data: { n: 1, priority: 9 } };
  let r = await client.pubsub.publish(pubsub, topic, widget, { contentType: 'application/cloudevents+json' });
  assert(!r.error, `publish: ${r.error}`);
  r = await client.pubsub.publish(pubsub, topic, { n: 2, priority: 7 });
  assert(!r.error, `publish: ${r.error}`);
  await until('the widget and the urgent event', () => received.widgets.length === 1 && received.urgent.length === 1);
  assert(received.widgets[0].n === 1, `widget route got ${JSON.stringify(received.widgets)}`);
  assert(received.urgent[0].n === 2, `urgent route got ${JSON.stringify(received.urgent)}`);
});

check('an event that matches no rule goes to the default route', async () => {
  const r = await client.pubsub.publish(pubsub, topic, { n: 3, priority: 1 });
  assert(!r.error, `publish: ${r.error}`);
  await until('the default route', () => received.products.length === 1);
  assert(received.products[0].n === 3, `default route got ${JSON.stringify(received.products)}`);
  assert(received.widgets.length === 1 && received.urgent.length === 1, 'it reached another route too');
});

// The SDK announces a default route even when none is given (its own `default` path, which it
// does not serve): Dapr's answer to the 404 is to drop the event, so it reaches no handler.
check('without a default route an event that matches no rule reaches no handler', async () => {
  let r = await client.pubsub.publish(pubsub, auditTopic, { level: 'low', n: 1 });
  assert(!r.error, `publish: ${r.error}`);
  r = await client.pubsub.publish(pubsub, auditTopic, { level: 'high', n: 2 });
  assert(!r.error, `publish: ${r.error}`);
  await until('the matching audit event', () => received.audit.length >= 1);
  await sleep(200);
  assert(received.audit.length === 1 && received.audit[0].n === 2, `audit got ${JSON.stringify(received.audit)}`);
});

check(`RETRY is delivered again ${retries} times, then the event is in the dead-letter topic`, async () => {
  const r = await client.pubsub.publish(pubsub, topic, { n: 4, kind: 'poison' });
  assert(!r.error, `publish: ${r.error}`);
  await until('the dead-lettered event', () => received.dead.length === 1);
  assert(received.poison.length === retries + 1, `${received.poison.length} deliveries before the dead letter`);
  assert(received.dead[0].n === 4, `dead letter got ${JSON.stringify(received.dead)}`);
  await sleep(100);
  assert(received.dead.length === 1 && received.poison.length === retries + 1, 'delivered again after the dead letter');
});

check('service invocation returns the app\'s reply; an unknown app id is an error', async () => {
  const reply = await client.invoker.invoke(appId, 'echo', HttpMethod.POST, { hello: 'dapr' });
  assert(reply && reply.echoed && reply.echoed.hello === 'dapr', `reply ${JSON.stringify(reply)}`);
  let failed = null;
  try {
    await client.invoker.invoke(`no-such-app-${run}`, 'echo', HttpMethod.POST, { hello: 'dapr' });
  } catch (e) {
    failed = e;
  }
  assert(failed !== null, 'invoking an unknown app id succeeded');
});

check('state: saved values read back, a missing key is empty, a wrong ETag is 409', async () => {
  const key = `k-${run}`;
  let r = await client.state.save(store, [{ key, value: { total: 42 } }]);
  assert(!r.error, `save: ${r.error}`);
  const value = await client.state.get(store, key);
  assert(value && value.total === 42, `read back ${JSON.stringify(value)}`);
  const missing = await client.state.get(store, `missing-${run}`);
  assert(missing === '' || missing === undefined || missing === null, `missing key read ${JSON.stringify(missing)}`);
  r = await client.state.save(store, [{ key, value: { total: 0 }, etag: '999999' }]);
  assert(r.error && /"status":409/.test(r.error.message), `save with a wrong ETag: ${r.error && r.error.message}`);
  const after = await client.state.get(store, key);
  assert(after && after.total === 42, `a refused save changed the value: ${JSON.stringify(after)}`);
});

// The SDK's client cannot even start against a sidecar that refuses it (it waits for
// `/v1.0/metadata`, which needs the token too), so the refusals are asked with plain fetch.
check('the sidecar refuses calls without the right API token (401) and sent the app token on every call', async () => {
  for (const token of [undefined, 'wrong-token']) {
    const headers = { 'content-type': 'application/json' };
    if (token) headers['dapr-api-token'] = token;
    const publish = await fetch(`${sidecarUrl}/v1.0/publish/${pubsub}/${topic}`, { method: 'POST', headers, body: '{"n":5}' });
    assert(publish.status === 401, `publish with token ${token}: ${publish.status}`);
    const state = await fetch(`${sidecarUrl}/v1.0/state/${store}/k-${run}`, { headers });
    assert(state.status === 401, `state with token ${token}: ${state.status}`);
    const invoke = await fetch(`${sidecarUrl}/v1.0/invoke/${appId}/method/echo`, { method: 'POST', headers, body: '{}' });
    assert(invoke.status === 401, `invoke with token ${token}: ${invoke.status}`);
  }
  const health = await fetch(`${sidecarUrl}/v1.0/healthz`);
  assert(health.status === 204, `healthz without a token (exempt): ${health.status}`);
  await sleep(100);
  assert(received.products.every((d) => d.n !== 5), 'a refused publish was delivered');
  assert(appRequests > 0, 'the app got no request');
  assert(untokened.length === 0, `calls to the app without its token: ${untokened.join(', ')}`);
});

async function main() {
  const record = (into) => async (data) => {
    received[into].push(data);
    return DaprPubSubStatusEnum.SUCCESS;
  };
  await server.pubsub.subscribeWithOptions(pubsub, topic, {
    route: {
      rules: [
        { match: 'event.type == "widget"', path: 'widgets' },
        { match: 'has(event.data.priority) && event.data.priority > 5', path: 'urgent' },
        { match: 'has(event.data.kind) && event.data.kind == "poison"', path: 'poison' },
      ],
      default: 'products',
    },
    deadLetterTopic: deadTopic,
  });
  server.pubsub.subscribeToRoute(pubsub, topic, 'widgets', record('widgets'));
  server.pubsub.subscribeToRoute(pubsub, topic, 'urgent', record('urgent'));
  server.pubsub.subscribeToRoute(pubsub, topic, 'products', record('products'));
  server.pubsub.subscribeToRoute(pubsub, topic, 'poison', async (data) => {
    received.poison.push(data);
    return DaprPubSubStatusEnum.RETRY;
  });
  await server.pubsub.subscribe(pubsub, deadTopic, record('dead'));
  await server.pubsub.subscribeWithOptions(pubsub, auditTopic, {
    route: { rules: [{ match: 'event.data.level == "high"', path: 'audit' }] },
  });
  server.pubsub.subscribeToRoute(pubsub, auditTopic, 'audit', record('audit'));
  await server.invoker.listen('echo', async (req) => ({ echoed: JSON.parse(req.body) }), { method: HttpMethod.POST });
  await server.start();

  let failed = false;
  for (const [name, body] of checks) {
    try {
      await body();
      console.log(`PASS ${name}`);
    } catch (e) {
      console.log(`FAIL ${name}: ${e.message}`);
      failed = true;
      break;
    }
  }
  await server.stop();
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAIL setup: ${e.stack || e}`);
  process.exit(1);
});
