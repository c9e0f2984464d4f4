import { describe, expect, it } from 'vitest';

import {
  diffRows,
  formatBytes,
  formatDevices,
  formatRtt,
  linkKey,
  linkRows,
  parseSnapshot,
  peerCount,
  peerRows,
  shortId,
  statusText
} from '../src/model';
import { A, B, C, link, peer, snapshot, threePeers } from './fixtures';

describe('parseSnapshot', () => {
  it('reads a joined snapshot', () => {
    const s = parseSnapshot(threePeers());
    expect(s.joined).toBe(true);
    if (!s.joined) throw new Error('joined');
    expect(s.peers.map(p => p.id)).toEqual([B, A, C]);
    expect(s.peers[2].layers).toBeNull();
    expect(s.links[1]).toMatchObject({ kind: 'webrtc-relay', type: 'relay', relayed: true, rtt_ms: 31.5 });
  });

  it('treats anything but joined: true as not joined, keeping an error', () => {
    expect(parseSnapshot({ joined: false })).toEqual({ joined: false });
    expect(parseSnapshot(null)).toEqual({ joined: false });
    expect(parseSnapshot('nope')).toEqual({ joined: false });
    expect(parseSnapshot({ joined: 'yes', peers: [] })).toEqual({ joined: false });
    expect(parseSnapshot({ joined: false, error: 'boom' })).toEqual({ joined: false, error: 'boom' });
  });

  it('drops malformed peers and links, and duplicate peers', () => {
    const s = parseSnapshot(
      snapshot(
        [peer(A, 'a'), { name: 'no id' }, 42, peer(A, 'dup'), peer(B, 'b', { devices: 'x', layers: [1] })],
        [link(A, B), { a: A }, null]
      )
    );
    if (!s.joined) throw new Error('joined');
    expect(s.peers.map(p => p.name)).toEqual(['a', 'b']);
    expect(s.peers[1].devices).toEqual([]);
    expect(s.peers[1].layers).toBeNull();
    expect(s.links).toHaveLength(1);
  });

  it('marks a relay-type link as relayed even without the flag', () => {
    const s = parseSnapshot(snapshot([], [link(A, B, { type: 'relay', relayed: false })]));
    if (!s.joined) throw new Error('joined');
    expect(s.links[0].relayed).toBe(true);
  });

  it('reads each link’s kind; a kernel that sends none only had WebRTC links', () => {
    const s = parseSnapshot(
      snapshot(
        [],
        [
          link(A, B, { kind: 'direct-tcp' }),
          link(A, C, { kind: undefined }),
          link(B, C, { kind: undefined, type: 'relay', relayed: true })
        ]
      )
    );
    if (!s.joined) throw new Error('joined');
    expect(s.links.map(l => [l.kind, l.relayed])).toEqual([
      ['direct-tcp', false],
      ['webrtc-direct', false],
      ['webrtc-relay', true]
    ]);
  });
});

describe('formatting', () => {
  it('formats bytes, rtt, ids', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(80 * 2 ** 30)).toBe('80.0 GiB');
    expect(formatBytes(null)).toBe('—');
    expect(formatRtt(null)).toBe('—');
    expect(formatRtt(0.4242)).toBe('0.42 ms');
    expect(formatRtt(31.55)).toBe('31.6 ms');
    expect(shortId('0123456789abcdef')).toBe('01234567');
    expect(shortId('abc')).toBe('abc');
  });

  it('groups identical devices', () => {
    const gpu = { kind: 'cuda', name: 'H100', memory_bytes: 80 * 2 ** 30 };
    expect(formatDevices([gpu, gpu, { kind: 'cpu', name: '', memory_bytes: null }])).toBe(
      '2× cuda H100 (80.0 GiB), cpu'
    );
    expect(formatDevices([])).toBe('—');
  });
});

describe('rows', () => {
  it('puts the kernel itself first, then peers by name', () => {
    const rows = peerRows(parseSnapshot(threePeers()));
    expect(rows.map(r => r.key)).toEqual([A, B, C]);
    expect(rows[0].isSelf).toBe(true);
    expect(rows[0].cells).toEqual({
      name: 'alice (this kernel)',
      id: 'aaaaaaaa',
      devices: 'cpu x86_64 (16.0 GiB)',
      services: 'shard',
      layers: '0–15'
    });
    expect(rows[2].cells.services).toBe('—');
    expect(rows[2].cells.layers).toBe('—');
    expect(rows[1].title).toContain(B);
  });

  it('shows links once per pair with their kind and RTT', () => {
    const s = parseSnapshot(snapshot([peer(A, 'alice'), peer(B, 'bob')], [link(A, B), link(B, A, { rtt_ms: 9 })]));
    const rows = linkRows(s);
    expect(rows).toHaveLength(1);
    expect(rows[0].cells).toEqual({ peers: 'alice ↔ bob', kind: 'webrtc-direct', type: 'host', rtt: '0.42 ms' });
    expect(rows[0].title).toContain('peer to peer');
    const relayed = linkRows(parseSnapshot(threePeers())).find(r => r.key === linkKey(A, C))!;
    expect(relayed.cells.kind).toBe('webrtc-relay');
    expect(relayed.relayed).toBe(true);
    expect(relayed.title).toContain('TURN server');
    const tcp = linkRows(parseSnapshot(snapshot([], [link(A, B, { kind: 'direct-tcp' })])))[0];
    expect([tcp.kind, tcp.cells.kind, tcp.relayed]).toEqual(['direct-tcp', 'direct-tcp', false]);
    expect(tcp.title).toContain('TCP + TLS 1.3');
    // an end the snapshot has no peer for is shown by its short id
    expect(linkRows(parseSnapshot(snapshot([], [link(A, B)])))[0].cells.peers).toBe('aaaaaaaa ↔ bbbbbbbb');
  });

  it('counts peers for the status bar', () => {
    expect(statusText(null)).toBe('Mesh: not joined');
    expect(statusText({ joined: false })).toBe('Mesh: not joined');
    expect(statusText(parseSnapshot(threePeers()))).toBe('Mesh: 3 peers');
    expect(statusText(parseSnapshot(snapshot([peer(A, 'a')])))).toBe('Mesh: 1 peer');
    expect(peerCount({ joined: false })).toBe(0);
  });
});

describe('diffRows', () => {
  it('reports added, removed, changed and the new order', () => {
    const before = peerRows(parseSnapshot(threePeers()));
    const s = threePeers();
    s.peers = [peer(A, 'alice', { services: ['shard', 'verify'] }), peer(C, 'carol', { services: [], layers: null })];
    const after = peerRows(parseSnapshot(s));
    const diff = diffRows(before, after);
    expect(diff.added).toEqual([]);
    expect(diff.removed).toEqual([B]);
    expect(diff.changed.map(r => r.key)).toEqual([A]);
    expect(diff.order).toEqual([A, C]);
  });

  it('is empty for identical rows', () => {
    const rows = peerRows(parseSnapshot(threePeers()));
    const diff = diffRows(rows, peerRows(parseSnapshot(threePeers())));
    expect(diff.added.length + diff.removed.length + diff.changed.length).toBe(0);
  });
});
