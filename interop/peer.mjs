// The TypeScript side of purista-rs's interop test (purista/tests/interop.rs).
//
// Runs real @purista/core services on a PURISTA DefaultEventBridge whose messages also travel
// over a loopback socket to the Rust test, one JSON document per line:
//
//   both ways      {"envelope": <PURISTA message>}        a message, exactly as its side wrote it
//   Rust -> Node   {"control": {"id", "op", ...}}         do something as a TypeScript client
//   Node -> Rust   {"reply": {"id", "ok", ...}}           what came of it
//   Node -> Rust   {"checked": {...}}                     PURISTA's reading of a Rust envelope
//   Node -> Rust   {"observed": {"subscription", "message"}}  a TypeScript subscription fired
//   Node -> Rust   {"ready": {"instanceId"}}               the services are up
//
// A message that the local services handle (a command or stream for a local endpoint, a
// response or frame addressed to this instance, any event) is routed by PURISTA's own bridge
// code; everything any service emits also goes to Rust, unchanged.

import net from 'node:net'
import readline from 'node:readline'
import {
	DefaultEventBridge,
	EBMessageType,
	HandledError,
	ServiceBuilder,
	StatusCode,
	getCommandQueueName,
	getNewEBMessageId,
	isCommand,
	isCommandErrorResponse,
	isCommandResponse,
	isCommandSuccessResponse,
	isCustomMessage,
	isInfoMessage,
	isStreamControl,
	isStreamFrame,
	isStreamMessage,
	isStreamOpenRequest,
	serializeOtp,
	throwIfNotValidMessage,
} from '@purista/core'
import { z } from 'zod'

const port = Number(process.env.PURISTA_INTEROP_PORT)
const socket = net.connect(port, '127.0.0.1')
socket.setNoDelay(true)
const send = line => socket.write(`${JSON.stringify(line)}\n`)

/** PURISTA's in-memory bridge, with the socket to Rust as a second wire. */
class PipeEventBridge extends DefaultEventBridge {
	/** True when PURISTA's own routing in this process has a consumer for `message`. */
	isLocal(message) {
		if (isCommand(message)) {
			return this.serviceFunctions.has(getCommandQueueName(message.receiver))
		}
		if (isStreamMessage(message) && (isStreamOpenRequest(message) || isStreamControl(message))) {
			const instance = message.receiver?.instanceId
			return (
				this.streamFunctions.has(getCommandQueueName(message.receiver)) &&
				(instance === undefined || instance === this.instanceId)
			)
		}
		if (isCommandResponse(message) || isStreamMessage(message)) {
			return message.receiver?.instanceId === this.instanceId
		}
		return true
	}

	async emitMessage(message) {
		// The stamp DefaultEventBridge.emitMessage puts on every message, field for field.
		const msg = Object.freeze({
			...message,
			id: getNewEBMessageId(),
			timestamp: Date.now(),
			traceId: message.traceId,
			instanceId: this.instanceId,
			otp: serializeOtp(),
		})
		if (this.isLocal(msg)) {
			this.readStream.push(msg)
		}
		send({ envelope: msg })
		return msg
	}

	/** A message from Rust: routed by PURISTA's code exactly as it arrived. */
	receive(message) {
		if (this.isLocal(message)) {
			this.readStream.push(message)
		}
	}
}

/** What PURISTA's own checks say about a message Rust wrote. */
const check = message => {
	const problems = []
	try {
		throwIfNotValidMessage(message)
	} catch (err) {
		problems.push(`throwIfNotValidMessage: ${err.message}`)
	}
	const guards = {
		command: isCommand,
		commandSuccessResponse: isCommandSuccessResponse,
		commandErrorResponse: isCommandErrorResponse,
		customMessage: isCustomMessage,
		stream: isStreamMessage,
	}
	const guard = guards[message.messageType] ?? isInfoMessage
	if (!guard(message)) {
		problems.push(`type guard for ${message.messageType} refused it`)
	}
	if (isCommandErrorResponse(message) && typeof message.isHandledError !== 'boolean') {
		problems.push('error response without boolean isHandledError')
	}
	if (isStreamMessage(message) && isStreamFrame(message)) {
		// StreamFramePayload: a number in `sequence` (frames a bridge writes to end a lost
		// session may leave it out), `error` as StreamErrorPayload.
		const p = message.payload
		if (p.sequence !== undefined && typeof p.sequence !== 'number') {
			problems.push('frame sequence is not a number')
		}
		if (p.frameType === 'error' && typeof p.error?.isHandledError !== 'boolean') {
			problems.push('error frame without boolean error.isHandledError')
		}
	}
	return problems
}

const tsCalc = new ServiceBuilder({
	serviceName: 'tsCalc',
	serviceVersion: '1',
	serviceDescription: 'TypeScript side of the purista-rs interop test',
})

const double = tsCalc
	.getCommandBuilder('double', 'doubles n')
	.addPayloadSchema(z.object({ n: z.number() }))
	.addParameterSchema(z.object({ unit: z.string() }))
	.addOutputSchema(z.object({ n: z.number(), unit: z.string() }))
	.setCommandFunction(async function (_context, payload, parameter) {
		return { n: payload.n * 2, unit: parameter.unit }
	})

const nothing = tsCalc.getCommandBuilder('nothing', 'answers null').setCommandFunction(async function () {
	return null
})

const refuse = tsCalc.getCommandBuilder('refuse', 'a handled error').setCommandFunction(async function () {
	throw new HandledError(StatusCode.Conflict, 'order already shipped', { orderId: 'o-1' })
})

const crash = tsCalc.getCommandBuilder('crash', 'an unhandled error').setCommandFunction(async function () {
	throw new Error('secret internals')
})

const whoAmI = tsCalc
	.getCommandBuilder('whoAmI', 'echoes the flow ids')
	.setCommandFunction(async function (context) {
		return {
			principalId: context.message.principalId ?? null,
			tenantId: context.message.tenantId ?? null,
		}
	})

const announce = tsCalc
	.getCommandBuilder('announce', 'emits tsAnnounced')
	.canEmit('tsAnnounced', z.object({ text: z.string() }))
	.setCommandFunction(async function (context, payload) {
		await context.emit('tsAnnounced', { text: payload.text })
		return 'announced'
	})

const onRust = tsCalc
	.getSubscriptionBuilder('onRust', 'sees rustHappened')
	.subscribeToEvent('rustHappened')
	.setSubscriptionFunction(async function (context) {
		send({ observed: { subscription: 'onRust', message: context.message } })
	})

// What a PURISTA tool listing functions sees: every infoServiceFunctionAdded from Rust.
const onFunctionAdded = tsCalc
	.getSubscriptionBuilder('onFunctionAdded', 'sees functions Rust registers')
	.filterForMessageType(EBMessageType.InfoServiceFunctionAdded)
	.filterSentFrom('rsCalc', '1')
	.setSubscriptionFunction(async function (context) {
		send({ observed: { subscription: 'onFunctionAdded', message: context.message } })
	})

const count = tsCalc
	.getStreamBuilder('count', 'counts to payload.to')
	.setStreamFunction(async function (_context, payload, _parameter, writer) {
		for (let i = 1; i <= payload.to; i++) {
			await writer.write(i)
		}
		await writer.close({ total: payload.to })
	})

const failing = tsCalc
	.getStreamBuilder('failing', 'one chunk, then a handled error')
	.setStreamFunction(async function (_context, _payload, _parameter, writer) {
		await writer.write('first')
		throw new HandledError(StatusCode.UnprocessableEntity, 'cannot continue', { at: 1 })
	})

const definitions = builders => builders.map(b => b.getDefinition())
tsCalc.addCommandDefinition(...definitions([double, nothing, refuse, crash, whoAmI, announce]))
tsCalc.addSubscriptionDefinition(...definitions([onRust, onFunctionAdded]))
tsCalc.addStreamDefinition(...definitions([count, failing]))

const bridge = new PipeEventBridge({ logLevel: 'error' })

const probeSender = { serviceName: 'tsProbe', serviceVersion: '1', serviceTarget: 'probe' }

const describeError = err => ({
	handled: err instanceof HandledError,
	name: err?.name,
	status: err?.errorCode,
	message: err?.message,
	data: err?.data ?? null,
})

const controls = {
	// A command from a TypeScript client: what PURISTA's invoke resolves or rejects with.
	async invoke(c) {
		try {
			const value = await bridge.invoke(
				{
					messageType: 'command',
					contentType: 'application/json',
					contentEncoding: 'utf-8',
					sender: probeSender,
					receiver: c.receiver,
					payload: { payload: c.payload, parameter: c.parameter },
					principalId: c.principalId,
					tenantId: c.tenantId,
				},
				c.ttl ?? 5000,
			)
			return { ok: true, value: value === undefined ? '<undefined>' : value }
		} catch (err) {
			return { ok: false, error: describeError(err) }
		}
	},
	// A stream session from a TypeScript consumer: every frame payload it read, in order.
	async openStream(c) {
		const frames = []
		try {
			const handle = await bridge.openStream(
				{
					messageType: 'stream',
					contentType: 'application/json',
					contentEncoding: 'utf-8',
					sender: probeSender,
					receiver: c.receiver,
					payload: { frameType: 'open', payload: c.payload, parameter: c.parameter },
					principalId: c.principalId,
					tenantId: c.tenantId,
				},
				c.ttl ?? 5000,
			)
			for await (const frame of handle) {
				frames.push(frame.payload)
			}
			return { ok: true, frames }
		} catch (err) {
			return { ok: false, frames, error: describeError(err) }
		}
	},
}

const lines = readline.createInterface({ input: socket })
lines.on('line', async line => {
	const doc = JSON.parse(line)
	if (doc.envelope) {
		const message = doc.envelope
		const problems = check(message)
		send({
			checked: {
				id: message.id,
				messageType: message.messageType,
				problems,
				reencoded: JSON.parse(JSON.stringify(message)),
			},
		})
		bridge.receive(message)
	} else if (doc.control) {
		const { id, op } = doc.control
		const run = controls[op]
		const reply = run ? await run(doc.control) : { ok: false, error: { message: `unknown op ${op}` } }
		send({ reply: { id, ...reply } })
	}
})
// The test ends by closing the socket; nothing here outlives it.
socket.on('close', () => process.exit(0))
socket.on('error', () => process.exit(1))

await new Promise(resolve => socket.once('connect', resolve))
await bridge.start()
const service = await tsCalc.getInstance(bridge, { logLevel: 'error' })
await service.start()
send({ ready: { instanceId: bridge.instanceId } })
