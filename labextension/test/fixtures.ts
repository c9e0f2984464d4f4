/** Snapshots shaped like the kernel's (gradient_nb.mesh), used by several tests. */

export function peer(id: string, name: string, extra: Record<string, unknown> = {}) {
  return {
    id,
    name,
    devices: [{ kind: 'cpu', name: 'x86_64', memory_bytes: 16 * 2 ** 30 }],
    free_memory_bytes: 8 * 2 ** 30,
    tflops: 0.25,
    services: ['shard'],
    layers: [0, 15],
    last_seen: 1700000000,
    ...extra
  };
}

export function link(a: string, b: string, extra: Record<string, unknown> = {}) {
  return {
    a,
    b,
    kind: 'webrtc-direct',
    type: 'host',
    relayed: false,
    rtt_ms: 0.42,
    bytes_sent: 2048,
    bytes_received: 1024,
    ...extra
  };
}

export function snapshot(peers: unknown[], links: unknown[] = []) {
  return {
    joined: true,
    mesh: 'default',
    self: 'aaaaaaaaaaaa1111',
    rendezvous: 'ws://127.0.0.1:8765',
    peers,
    links
  };
}

export const A = 'aaaaaaaaaaaa1111';
export const B = 'bbbbbbbbbbbb2222';
export const C = 'cccccccccccc3333';

export function threePeers() {
  return snapshot(
    [peer(B, 'bob'), peer(A, 'alice'), peer(C, 'carol', { services: [], layers: null })],
    [link(A, B), link(A, C, { kind: 'webrtc-relay', type: 'relay', relayed: true, rtt_ms: 31.5 })]
  );
}
