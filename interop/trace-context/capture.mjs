// Captures how real @purista/core writes and reads the `otp` trace-context carrier: every
// message its DefaultEventBridge writes, and every span it finishes, for three invocations of
// one command (see README.md). Output: one JSON document on stdout.
import { DefaultEventBridge, ServiceBuilder } from '@purista/core'
import { InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base'
import { z } from 'zod'

const exporter = new InMemorySpanExporter()
const spanProcessor = new SimpleSpanProcessor(exporter)

const bridge = new DefaultEventBridge({ spanProcessor, logLevel: 'error' })
await bridge.start()

// Every message as the bridge writes it (the bridge pipes this stream to its dispatcher).
const written = []
bridge.readStream.on('data', message => written.push(JSON.parse(JSON.stringify(message))))

const builder = new ServiceBuilder({ serviceName: 'Ping', serviceVersion: '1', serviceDescription: 'otp capture' })
const ping = builder
	.getCommandBuilder('ping', 'answers pong')
	.setSuccessEventName('pinged')
	.addPayloadSchema(z.object({ ping: z.string() }))
	.addParameterSchema(z.object({}))
	.addOutputSchema(z.object({ pong: z.string() }))
	.setCommandFunction(async function (_context, payload) {
		return { pong: payload.ping }
	})
builder.addCommandDefinition(ping.getDefinition())
const service = await builder.getInstance(bridge, { spanProcessor, logLevel: 'error' })
await service.start()

const caller = { serviceName: 'Outside', serviceVersion: '1', serviceTarget: 'capture', instanceId: 'capture' }
const receiver = { serviceName: 'Ping', serviceVersion: '1', serviceTarget: 'ping' }
const settle = () => new Promise(resolve => setTimeout(resolve, 200))

const spansOf = traceId =>
	exporter
		.getFinishedSpans()
		.filter(s => s.spanContext().traceId === traceId)
		.map(s => ({
			name: s.name,
			kind: s.kind,
			traceId: s.spanContext().traceId,
			spanId: s.spanContext().spanId,
			parentSpanId: s.parentSpanContext?.spanId ?? null,
		}))

const messagesOfTrace = (messages, traceId) =>
	messages.filter(m => m.otp && JSON.parse(m.otp).traceparent?.split('-')[1] === traceId)

// A: PURISTA starts the trace (no otp on the input).
const startA = written.length
await bridge.invoke({ sender: caller, receiver, payload: { payload: { ping: 'a' }, parameter: {} }, traceId: 'purista-trace-a' })
await settle()
const notInfo = m => !m.messageType.startsWith('info')
const writtenA = written.slice(startA).filter(notInfo)
const commandA = writtenA.find(m => m.messageType === 'command')
const traceA = JSON.parse(commandA.otp).traceparent.split('-')[1]

// B: the input carries a context written the way purista-rs writes it; PURISTA must continue it.
const ours = { traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' }
const startB = written.length
await bridge.invoke({ sender: caller, receiver, payload: { payload: { ping: 'b' }, parameter: {} }, traceId: 'purista-trace-b', otp: JSON.stringify(ours) })
await settle()
const writtenB = written.slice(startB).filter(notInfo)

// C: the same with a tracestate.
const oursWithState = {
	traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
	tracestate: 'purista=rs,congo=t61rcWkgMzE',
}
const startC = written.length
await bridge.invoke({ sender: caller, receiver, payload: { payload: { ping: 'c' }, parameter: {} }, traceId: 'purista-trace-c', otp: JSON.stringify(oursWithState) })
await settle()
const writtenC = written.slice(startC).filter(notInfo)

await service.destroy()
await bridge.destroy()

const out = {
	capturedWith: {
		'@purista/core': JSON.parse(await (await import('node:fs/promises')).readFile(new URL('./node_modules/@purista/core/package.json', import.meta.url))).version,
		node: process.version,
	},
	puristaStarts: { messages: writtenA, spans: spansOf(traceA) },
	puristaContinuesOurs: { ourOtp: JSON.stringify(ours), messages: writtenB, spans: spansOf(ours.traceparent.split('-')[1]) },
	puristaKeepsTracestate: { ourOtp: JSON.stringify(oursWithState), messages: writtenC, spans: spansOf(oursWithState.traceparent.split('-')[1]) },
}
process.stdout.write(JSON.stringify(out, null, 2) + '\n')
process.exit(0)
