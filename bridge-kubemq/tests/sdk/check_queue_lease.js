// Drives a KubeMQ server with KubeMQ's official JavaScript SDK (npm `kubemq-js` 1.2.3, whose
// queue "transactions" are the StreamQueueMessage lease protocol the purista bridge uses) and
// checks what KubeMQ documents of it: one message per stream held for its visibility, ack,
// reject, visibility extension, resending a modified message, resending to a channel, the
// message coming back when the visibility runs out or the client goes away (receive count
// raised), the wait ending on an empty queue, MaxReceiveCount re-routing on reject.
//
//     node check_queue_lease.js HOST:PORT AUTH_TOKEN
//
// Prints one `PASS <check>` line per check and exits 0, or `FAIL <check>: <why>` and exits 1.
// Written against KubeMQ's documented behaviour, not the double's code: a real KubeMQ must
// pass it the same way.

const { QueuesClient, Utils } = require('kubemq-js');

const [address, token] = process.argv.slice(2);
const run = Utils.uuid().slice(0, 8);
const channel = (name) => `sdk-js-${run}.${name}`;
const client = new QueuesClient({ address, clientId: `sdk-js-${run}`, authToken: token, reconnectInterval: 0 });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const text = (body) => Buffer.from(body).toString();

function assert(ok, why) {
  if (!ok) throw new Error(why);
}

async function send(chan, body, policy) {
  const result = await client.send({ channel: chan, body: Utils.stringToBytes(body), metadata: 'm', policy });
  assert(!result.isError, `send failed: ${result.error}`);
}

async function pull(chan, wait = 1) {
  const r = await client.pull({ channel: chan, maxNumberOfMessages: 10, waitTimeoutSeconds: wait });
  assert(!r.isError || /no new message/i.test(r.error) || r.messages.length === 0, `pull failed: ${r.error}`);
  return r.messages;
}

// Opens a transaction (a StreamQueueMessage lease); resolves with the message or the error.
function lease(chan, visibilitySeconds, waitTimeoutSeconds) {
  const errors = [];
  let ended = false;
  return new Promise((resolve) => {
    const done = client.transaction({ channel: chan, visibilitySeconds, waitTimeoutSeconds }, (err, msg) => {
      if (err) {
        errors.push(err.message || String(err));
        resolve({ msg: null, errors, ended: () => ended });
      } else if (msg) {
        resolve({ msg, errors, ended: () => ended });
      }
    });
    done.then(() => { ended = true; }, () => { ended = true; });
  });
}

async function until(what, predicate, ms = 5000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await sleep(50);
  }
  throw new Error(what);
}

const checks = {
  async 'lease then ack removes the message and ends the stream'() {
    const chan = channel('ack');
    await send(chan, 'a1');
    const { msg, ended } = await lease(chan, 5, 2);
    assert(msg && text(msg.message.body) === 'a1', 'the message was not leased');
    assert(msg.message.attributes.receiveCount === 1, `first receive count ${msg.message.attributes.receiveCount}`);
    const other = await lease(chan, 5, 1);
    assert(!other.msg, 'a leased message was handed to a second stream');
    await msg.ack();
    await until('the stream did not end after the ack', async () => ended());
    assert((await pull(chan)).length === 0, 'an acked message came back');
  },

  async 'an expired visibility returns the message with its receive count raised'() {
    const chan = channel('expire');
    await send(chan, 'e1');
    const first = await lease(chan, 1, 2);
    assert(first.msg, 'the message was not leased');
    const began = Date.now();
    let back = [];
    await until('the message never came back', async () => {
      back = await pull(chan, 1);
      return back.length > 0;
    }, 6000);
    const took = Date.now() - began;
    assert(took >= 900, `the message came back after ${took} ms, before its 1 s visibility`);
    assert(text(back[0].body) === 'e1', 'another message came back');
    assert(back[0].attributes.receiveCount === 2, `receive count ${back[0].attributes.receiveCount}, not 2`);
  },

  async 'extending the visibility keeps the message hidden'() {
    const chan = channel('extend');
    await send(chan, 'x1');
    const { msg } = await lease(chan, 1, 2);
    assert(msg, 'the message was not leased');
    await msg.extendVisibility(4);
    await sleep(1800);
    const peeked = await client.peek({ channel: chan, maxNumberOfMessages: 10, waitTimeoutSeconds: 1 });
    assert(peeked.messages.length === 0, 'an extended lease expired at its first visibility');
    await msg.ack();
    await sleep(200);
    assert((await pull(chan)).length === 0, 'the acked message came back');
  },

  async 'resending a modified message replaces the leased one'() {
    const chan = channel('modified');
    const next = channel('modified-next');
    await send(chan, 'm1');
    const { msg } = await lease(chan, 5, 2);
    assert(msg, 'the message was not leased');
    await msg.resendNewMessage({ channel: next, body: Utils.stringToBytes('m2'), metadata: 'm' });
    let got = [];
    await until('the modified message never arrived', async () => {
      got = await pull(next, 1);
      return got.length > 0;
    });
    assert(text(got[0].body) === 'm2', 'the modified body was not sent');
    assert(got[0].attributes.receiveCount === 1, 'the modified message carries the old receive count');
    assert((await pull(chan)).length === 0, 'the original stayed in its queue');
  },

  async 'resending to a channel moves the message with its receive count reset'() {
    const chan = channel('resend');
    const to = channel('resend-to');
    await send(chan, 'r1');
    const { msg } = await lease(chan, 5, 2);
    assert(msg, 'the message was not leased');
    await msg.resendToChannel(to);
    let got = [];
    await until('the resent message never arrived', async () => {
      got = await pull(to, 1);
      return got.length > 0;
    });
    assert(text(got[0].body) === 'r1', 'the body changed on resend');
    assert(got[0].attributes.receiveCount === 1, `receive count ${got[0].attributes.receiveCount} after resend`);
    assert((await pull(chan)).length === 0, 'the original stayed in its queue');
  },

  async 'a client that goes away returns its message'() {
    const chan = channel('gone');
    await send(chan, 'g1');
    const { msg } = await lease(chan, 30, 2);
    assert(msg, 'the message was not leased');
    msg._stream.cancel();
    let back = [];
    await until('the message of a cancelled stream never came back', async () => {
      back = await pull(chan, 1);
      return back.length > 0;
    });
    assert(text(back[0].body) === 'g1', 'another message came back');
    assert(back[0].attributes.receiveCount === 2, `receive count ${back[0].attributes.receiveCount}, not 2`);
  },

  async 'an empty queue ends the wait with an error'() {
    const began = Date.now();
    const { msg, errors } = await lease(channel('empty'), 5, 1);
    const took = Date.now() - began;
    assert(!msg, 'an empty queue handed out a message');
    assert(errors.length > 0, 'no error for an empty queue');
    assert(took >= 900 && took < 5000, `the wait ended after ${took} ms, not at its 1 s`);
  },

  async 'a rejected message past MaxReceiveCount goes to MaxReceiveQueue'() {
    const chan = channel('poison');
    const dlq = channel('poison-dlq');
    await send(chan, 'p1', { maxReceiveCount: 1, maxReceiveQueue: dlq });
    const { msg } = await lease(chan, 5, 2);
    assert(msg, 'the message was not leased');
    await msg.reject();
    let dead = [];
    await until('the rejected message never reached the dead-letter queue', async () => {
      dead = await pull(dlq, 1);
      return dead.length > 0;
    });
    assert(text(dead[0].body) === 'p1', 'another message was dead-lettered');
    assert(dead[0].attributes.reRouted === true, 'the dead letter is not marked re-routed');
    assert((await pull(chan)).length === 0, 'the rejected message also came back');
  },
};

(async () => {
  let failed = false;
  for (const [name, check] of Object.entries(checks)) {
    try {
      await Promise.race([check(), sleep(30000).then(() => { throw new Error('timed out'); })]);
      console.log(`PASS ${name}`);
    } catch (e) {
      failed = true;
      console.log(`FAIL ${name}: ${e && e.message ? e.message : e}`);
    }
  }
  client.close && client.close();
  process.exit(failed ? 1 : 0);
})();
