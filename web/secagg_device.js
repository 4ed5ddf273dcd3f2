// The device's side of secure aggregation, as device_sim/device.py does it (`secagg`,
// `_secagg_answer`, `_masked_update`, `_mask`): a SecAggTask's answer (the SecAggAnswer JSON:
// base64 keys and ciphertexts, decimal shares), and a training or statistics result turned
// into the masked uint32 vector the coordinator sums (the task's SecureMasking says how).
// The arithmetic and the cryptography are secagg.js's.
//
// It keeps the instances of the last two rounds (training and statistics: four), by context.
// On the page it lives in the training worker (worker_host.js's `secagg` operation), so that
// the fixed-point encoding and the AES-CTR masks over a whole level never hold up the page,
// and the private keys never leave the worker.
//
// Whatever the protocol refuses (no keys for a context, a stage out of order, a neighbour that
// is not one, a layout that does not nest) is a SecAggSkip: the device logs it and answers or
// uploads nothing, as the Python device does.

import { SecAggClient, planLayout, secureEncoder, statisticsVector, trainingVector, WIDE_DIGITS } from './secagg.js';

export const KEPT_INSTANCES = 4; // the training and statistics instances of the last two rounds

/** A stage or an upload this device cannot answer in this instance; nothing is sent. */
export class SecAggSkip extends Error {
  constructor(message) {
    super(message);
    this.name = 'SecAggSkip';
  }
}

/** Standard base64 of bytes (Python's base64.b64encode). */
export function toBase64(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

/** The bytes of standard base64 `text`; SecAggSkip if it is not base64. */
export function fromBase64(text, what = 'a value') {
  if (typeof text !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4) {
    throw new SecAggSkip(`${what} is not base64`);
  }
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

/** Every client's statistics vector: one segment, the same for all (secagg.py statistics_layout). */
export function statisticsLayout(layers) {
  const size = WIDE_DIGITS * layers.reduce((n, [, channels]) => n + 1 + 2 * channels, 0);
  return { segments: [{ name: 'statistics', shape: [size], blocks: [0] }], presence: 0 };
}

/** `work()`, with the secagg core's refusals (plain Errors) as SecAggSkip. */
async function refusing(prefix, work) {
  try {
    return await work();
  } catch (err) {
    if (err instanceof SecAggSkip) throw err;
    throw new SecAggSkip(`${prefix}${err.message}`);
  }
}

const values = (tensor) => tensor?.data ?? tensor;

export class SecAggDevice {
  /**
   * @param {{create?: (context: string, index: number) => Promise<SecAggClient>}} [options]
   *   makes an instance's client (fresh WebCrypto keys; fixed ones in the shared vectors' tests)
   */
  constructor(options = {}) {
    this.create = options.create ?? ((context, index) => SecAggClient.create(context, index));
    this.instances = new Map(); // context -> SecAggClient, oldest first
  }

  _held(context) {
    const client = this.instances.get(context);
    if (!client) throw new SecAggSkip('no keys for this aggregation (restarted?); skipping');
    return client;
  }

  /**
   * The SecAggAnswer for a SecAggTask (advertise: fresh keys for its context; share: encrypted
   * shares for each neighbour; unmask: shares of the dropped clients' keys and the survivors'
   * seeds), as JSON; SecAggSkip where the instance refuses.
   */
  async answer(task) {
    const { context, stage } = task;
    if (stage === 'advertise') {
      const client = await this.create(context, task.index);
      while (this.instances.size >= KEPT_INSTANCES) this.instances.delete(this.instances.keys().next().value);
      this.instances.set(context, client);
      const keys = client.advertise();
      return { context, stage, c_public: toBase64(keys.cPublic), s_public: toBase64(keys.sPublic) };
    }
    const client = this._held(context);
    if (stage === 'share') {
      const neighbours = new Map(
        (task.neighbours ?? []).map((p) => {
          const what = `client ${p.index}'s key`;
          return [p.index, { cPublic: fromBase64(p.c_public, what), sPublic: fromBase64(p.s_public, what) }];
        }),
      );
      const shares = await refusing('', () => client.shareKeys(neighbours, Number(task.threshold ?? 0)));
      return { context, stage, shares: Object.fromEntries([...shares].map(([v, blob]) => [String(v), toBase64(blob)])) };
    }
    if (stage === 'unmask') {
      const shares = await refusing('', () => client.unmask(task.dropped ?? [], task.survivors ?? []));
      return { context, stage, unmask: Object.fromEntries([...shares].map(([v, x]) => [String(v), x.toString()])) };
    }
    throw new SecAggSkip(`no such secure aggregation stage ${JSON.stringify(stage)}`);
  }

  /**
   * The masked update of a training task: trained minus received (name -> Float32Array, a
   * Map), in the task's encoding (fixed point, or shared int8 rounded with `roundingSeed`) and
   * layout plan, rows of labels not held zeroed, the label presence appended, then masked in
   * Z_2^modulus_bits. `labels`: the labels this device holds.
   * @returns {Promise<Uint32Array | Uint16Array>}
   */
  async maskTraining(secure, rate, received, trained, labels, roundingSeed = 0) {
    const plan = secure.plan;
    if (!plan?.names) throw new SecAggSkip('the task carries no layout plan');
    const update = {};
    for (const name of plan.names) {
      const before = values(received.get(name));
      const after = values(trained.get(name));
      if (!before || !after || before.length !== after.length) throw new SecAggSkip(`no update for ${name}`);
      const delta = new Float64Array(after.length);
      for (let i = 0; i < delta.length; i++) delta[i] = after[i] - before[i];
      update[name] = delta;
    }
    const [vector, layout] = await refusing('cannot mask: ', () => [
      trainingVector(update, plan, rate, secureEncoder(secure, roundingSeed), labels),
      planLayout(plan, rate),
    ]);
    const bits = Number(secure.modulus_bits ?? 32);
    return this._mask(secure, vector, layout, (peerRate) => planLayout(plan, peerRate), bits);
  }

  /**
   * The masked sBN statistics: count, sum and sum of squares per layer of `secure.layers`,
   * wide-encoded at `secure.statistics_scale`, then masked. `stats`: LAYER.count / .mean /
   * .var (a Map of tensors or of arrays).
   * @returns {Promise<Uint32Array>}
   */
  async maskStatistics(secure, stats) {
    const layers = (secure.layers ?? []).map(([name, channels]) => [String(name), Number(channels)]);
    const arrays = Object.fromEntries([...stats].map(([name, tensor]) => [name, values(tensor)]));
    const vector = await refusing('cannot mask: ', () =>
      statisticsVector(arrays, layers, Number(secure.statistics_scale ?? 0)),
    );
    const layout = statisticsLayout(layers);
    return this._mask(secure, vector, layout, () => layout);
  }

  async _mask(secure, vector, layout, layoutOf, modulusBits = 32) {
    const client = this._held(secure.context);
    return refusing('cannot mask: ', () => {
      const peers = new Map(Object.entries(secure.peers ?? {}).map(([v, rate]) => [Number(v), layoutOf(Number(rate))]));
      const ciphertexts = new Map(
        Object.entries(secure.ciphertexts ?? {}).map(([v, blob]) => [Number(v), fromBase64(blob, `client ${v}'s shares`)]),
      );
      return client.mask(vector, layout, peers, ciphertexts, modulusBits);
    });
  }
}
