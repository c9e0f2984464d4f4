// The widget's render() against a DOM (jsdom) and a model shaped like anywidget's.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { JSDOM } from 'jsdom';

const dom = new JSDOM('<!doctype html><body></body>');
globalThis.document = dom.window.document;
const { default: widget } = await import('../src/topology.js');

class FakeModel {
  constructor(state) {
    this.state = state;
    this.handlers = new Map();
  }
  get(name) {
    return this.state[name];
  }
  set(name, value) {
    this.state[name] = value;
    for (const cb of this.handlers.get(`change:${name}`) || []) cb();
  }
  on(event, cb) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(cb);
  }
  off(event, cb) {
    this.handlers.get(event)?.delete(cb);
  }
}

const peer = (id, name) => ({ id, name, devices: [], services: [], layers: null });
const snap = (ids, links) => ({
  joined: true, mesh: 'm', self: ids[0], rendezvous: 'ws://x',
  peers: ids.map(id => peer(id, `n-${id}`)), links
});

test('renders peers as nodes, 3 then 2, keeping the elements of peers that stay', () => {
  const model = new FakeModel({
    height: 300,
    snapshot: snap(['a', 'b', 'c'], [
      { a: 'a', b: 'b', type: 'host', relayed: false, rtt_ms: 1.5 },
      { a: 'a', b: 'c', type: 'relay', relayed: true, rtt_ms: 40 }
    ])
  });
  const root = document.createElement('div');
  document.body.appendChild(root);
  const cleanup = widget.render({ model, el: root });
  try {
    const box = root.querySelector('.gnb-topology');
    assert.equal(box.dataset.peerCount, '3');
    const ids = () => [...root.querySelectorAll('g.gnb-node')].map(g => g.dataset.peerId);
    assert.deepEqual(ids(), ['a', 'b', 'c']);
    const lines = [...root.querySelectorAll('line')];
    assert.deepEqual(lines.map(l => [l.dataset.linkKey, l.dataset.relayed]), [['a|b', 'false'], ['a|c', 'true']]);
    assert.notEqual(lines[0].getAttribute('stroke'), lines[1].getAttribute('stroke'));
    assert.deepEqual([...root.querySelectorAll('.gnb-edge-label')].map(t => t.textContent), ['1.50 ms', '40.0 ms']);
    const nodeC = root.querySelector('g.gnb-node[data-peer-id="c"]');
    assert.match(nodeC.getAttribute('transform'), /^translate\(/);

    model.set('snapshot', snap(['a', 'c'], [{ a: 'a', b: 'c', type: 'relay', relayed: true, rtt_ms: 41 }]));
    assert.equal(box.dataset.peerCount, '2');
    assert.deepEqual(ids(), ['a', 'c']);
    assert.equal(root.querySelector('g.gnb-node[data-peer-id="c"]'), nodeC);
    assert.equal(root.querySelectorAll('line').length, 1);
    assert.match(root.querySelector('.gnb-summary').textContent, /2 peers, 1 link \(1 relayed\)/);

    model.set('snapshot', { joined: false });
    assert.equal(box.dataset.peerCount, '0');
    assert.match(root.querySelector('.gnb-summary').textContent, /has not joined a mesh/);
  } finally {
    cleanup();
  }
  assert.equal(model.handlers.get('change:snapshot').size, 0, 'cleanup unsubscribes');
});
