import assert from 'node:assert/strict';
import { test } from 'node:test';

import { edgeKey, mergeNodes, resolveEdges, seededPosition, snapshotToGraph, summary } from '../src/graph.js';

const A = 'aaaaaaaaaaaa1111';
const B = 'bbbbbbbbbbbb2222';
const C = 'cccccccccccc3333';
const D = 'dddddddddddd4444';

const peer = (id, name, extra = {}) => ({
  id, name, devices: [{ kind: 'cuda', name: 'H100', memory_bytes: 8e10 }], free_memory_bytes: 1,
  tflops: 1, services: ['shard'], layers: [0, 15], last_seen: 1, ...extra
});
const link = (a, b, extra = {}) => ({
  a, b, type: 'host', relayed: false, rtt_ms: 0.5, bytes_sent: 1, bytes_received: 1, ...extra
});
const snap = (peers, links = []) => ({ joined: true, mesh: 'default', self: A, rendezvous: 'ws://x', peers, links });

test('not joined gives an empty graph', () => {
  for (const s of [{ joined: false }, null, undefined, 'x', { joined: 'true' }]) {
    const g = snapshotToGraph(s);
    assert.equal(g.joined, false);
    assert.deepEqual(g.nodes, []);
    assert.deepEqual(g.edges, []);
  }
  assert.match(summary(snapshotToGraph({ joined: false })), /has not joined a mesh/);
});

test('peers become nodes and links become edges, direct vs relayed with RTT', () => {
  const g = snapshotToGraph(snap(
    [peer(A, 'alice'), peer(B, ''), peer(C, 'carol', { layers: null })],
    [link(A, B), link(A, C, { type: 'relay', relayed: true, rtt_ms: 42.25 }),
      link(B, C, { type: 'srflx', relayed: false, rtt_ms: null })]
  ));
  assert.deepEqual(g.nodes.map(n => [n.id, n.label, n.isSelf]), [[A, 'alice', true], [B, 'bbbbbbbb', false], [C, 'carol', false]]);
  assert.equal(g.nodes[0].devices, 'cuda H100');
  assert.deepEqual(g.nodes[0].layers, [0, 15]);
  assert.equal(g.nodes[2].layers, null);
  assert.deepEqual(g.edges.map(e => [e.key, e.relayed, e.label]), [
    [edgeKey(A, B), false, '0.50 ms'],
    [edgeKey(A, C), true, '42.3 ms'],
    [edgeKey(B, C), false, '']
  ]);
  assert.equal(summary(g), 'mesh default: 3 peers, 3 links (1 relayed)');
});

test('a relay-type link counts as relayed, duplicates and dangling or malformed entries are dropped', () => {
  const g = snapshotToGraph(snap(
    [peer(A, 'a'), peer(A, 'again'), { name: 'no id' }, peer(B, 'b')],
    [link(A, B, { type: 'relay', relayed: false }), link(B, A), link(A, D), link(A, A), { a: A }]
  ));
  assert.deepEqual(g.nodes.map(n => n.label), ['a', 'b']);
  assert.equal(g.edges.length, 1);
  assert.equal(g.edges[0].relayed, true);
});

test('positions persist: kept peers keep their node objects, removed ones go', () => {
  const W = 640;
  const H = 360;
  const g3 = snapshotToGraph(snap([peer(A, 'a'), peer(B, 'b'), peer(C, 'c')], [link(A, B), link(A, C)]));
  const first = mergeNodes([], g3, W, H);
  assert.deepEqual(first.added, [A, B, C]);
  // the simulation moves them
  first.nodes.forEach((n, i) => { n.x = 100 + i * 50; n.y = 200; n.vx = 1; });
  const nodeA = first.nodes[0];

  const g2 = snapshotToGraph(snap([peer(A, 'a', { services: ['verify'] }), peer(C, 'c')], [link(A, C)]));
  const second = mergeNodes(first.nodes, g2, W, H);
  assert.deepEqual(second.removed, [B]);
  assert.deepEqual(second.added, []);
  assert.deepEqual(second.kept, [A, C]);
  assert.equal(second.nodes[0], nodeA, 'same object, so d3 keeps its position and velocity');
  assert.deepEqual([nodeA.x, nodeA.y, nodeA.vx], [100, 200, 1]);
  assert.deepEqual(nodeA.services, ['verify'], 'data refreshed in place');
  assert.equal(second.nodes[1].x, 200);
});

test('a newcomer starts near a peer it links to; an isolated one at a seeded spot', () => {
  const W = 640;
  const H = 360;
  const a = { ...snapshotToGraph(snap([peer(A, 'a')])).nodes[0], x: 500, y: 300, vx: 0, vy: 0 };
  const g = snapshotToGraph(snap([peer(A, 'a'), peer(B, 'b'), peer(D, 'd')], [link(A, B)]));
  const { nodes, added } = mergeNodes([a], g, W, H);
  assert.deepEqual(added, [B, D]);
  const b = nodes[1];
  assert.ok(Math.hypot(b.x - 500, b.y - 300) < 0.3 * Math.min(W, H) + 1, 'b next to a');
  assert.deepEqual({ x: nodes[2].x, y: nodes[2].y }, seededPosition(D, W, H));
  // deterministic, inside the box, and different for different ids
  assert.deepEqual(seededPosition(D, W, H), seededPosition(D, W, H));
  assert.notDeepEqual(seededPosition(B, W, H), seededPosition(D, W, H));
  for (const id of [A, B, C, D]) {
    const p = seededPosition(id, W, H);
    assert.ok(p.x > 0 && p.x < W && p.y > 0 && p.y < H);
  }
});

test('resolveEdges points edges at node objects', () => {
  const g = snapshotToGraph(snap([peer(A, 'a'), peer(B, 'b')], [link(A, B)]));
  const { nodes } = mergeNodes([], g, 100, 100);
  const [e] = resolveEdges(nodes, g.edges);
  assert.equal(e.source, nodes[0]);
  assert.equal(e.target, nodes[1]);
  assert.deepEqual(resolveEdges(nodes.slice(0, 1), g.edges), []);
});
