// The topology anywidget: peers as nodes of a force layout, links colored direct vs relayed
// with their RTT. Bundled by esbuild into gradient_nb/notebook/static/topology.js.
import { forceCenter, forceCollide, forceLink, forceManyBody, forceSimulation } from 'd3-force';

import { mergeNodes, resolveEdges, snapshotToGraph, summary } from './graph.js';

const SVG = 'http://www.w3.org/2000/svg';
const DIRECT = '#2e7d32';
const RELAYED = '#ef6c00';

const CSS = `
.gnb-topology { font: 12px var(--jp-ui-font-family, sans-serif); color: var(--jp-ui-font-color1, #222); }
.gnb-topology svg { display: block; width: 100%; background: var(--jp-layout-color1, #fff);
  border: 1px solid var(--jp-border-color2, #ddd); border-radius: 4px; }
.gnb-topology .gnb-node circle { fill: var(--jp-brand-color1, #1976d2); stroke: #fff; stroke-width: 1.5; }
.gnb-topology .gnb-node.gnb-self circle { fill: var(--jp-brand-color0, #0d47a1); stroke-width: 3; }
.gnb-topology .gnb-node text { fill: var(--jp-ui-font-color1, #222); pointer-events: none; }
.gnb-topology .gnb-edge-label { fill: var(--jp-ui-font-color2, #555); font-size: 10px; pointer-events: none; }
.gnb-topology .gnb-summary { padding: 4px 2px; color: var(--jp-ui-font-color2, #555); }
.gnb-topology .gnb-legend span { margin-right: 12px; }
`;

function el(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    node.setAttribute(k, String(v));
  }
  if (parent) {
    parent.appendChild(node);
  }
  return node;
}

function render({ model, el: root }) {
  const width = 640;
  const style = document.createElement('style');
  style.textContent = CSS;
  const box = document.createElement('div');
  box.className = 'gnb-topology';
  const svg = el('svg');
  const edgeLayer = el('g', { class: 'gnb-edges' }, svg);
  const labelLayer = el('g', { class: 'gnb-edge-labels' }, svg);
  const nodeLayer = el('g', { class: 'gnb-nodes' }, svg);
  const caption = document.createElement('div');
  caption.className = 'gnb-summary';
  const legend = document.createElement('div');
  legend.className = 'gnb-legend';
  legend.innerHTML =
    `<span style="color:${DIRECT}">━ direct</span><span style="color:${RELAYED}">┅ relayed (TURN)</span>`;
  box.append(style, svg, caption, legend);
  root.appendChild(box);

  let height = model.get('height') || 360;
  const size = () => {
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    svg.setAttribute('height', String(height));
  };
  size();

  // Elements by key, kept across snapshots like the node objects themselves.
  const nodeEls = new Map();
  const edgeEls = new Map();
  let nodes = [];
  let links = [];

  const simulation = forceSimulation([])
    .force('charge', forceManyBody().strength(-260))
    .force('link', forceLink([]).id(d => d.id).distance(120))
    .force('center', forceCenter(width / 2, height / 2))
    .force('collide', forceCollide(28))
    .on('tick', draw);

  function draw() {
    for (const n of nodes) {
      const x = Math.max(20, Math.min(width - 20, n.x));
      const y = Math.max(20, Math.min(height - 20, n.y));
      nodeEls.get(n.id)?.setAttribute('transform', `translate(${x.toFixed(1)},${y.toFixed(1)})`);
    }
    for (const l of links) {
      const els = edgeEls.get(l.key);
      if (!els) continue;
      const clamp = (v, hi) => Math.max(20, Math.min(hi - 20, v));
      const [x1, y1, x2, y2] = [clamp(l.source.x, width), clamp(l.source.y, height),
        clamp(l.target.x, width), clamp(l.target.y, height)];
      els.line.setAttribute('x1', x1.toFixed(1));
      els.line.setAttribute('y1', y1.toFixed(1));
      els.line.setAttribute('x2', x2.toFixed(1));
      els.line.setAttribute('y2', y2.toFixed(1));
      els.label.setAttribute('x', ((x1 + x2) / 2).toFixed(1));
      els.label.setAttribute('y', ((y1 + y2) / 2 - 4).toFixed(1));
    }
  }

  function update() {
    const graph = snapshotToGraph(model.get('snapshot'));
    const merged = mergeNodes(nodes, graph, width, height);
    nodes = merged.nodes;
    links = resolveEdges(nodes, graph.edges);

    for (const id of merged.removed) {
      nodeEls.get(id)?.remove();
      nodeEls.delete(id);
    }
    for (const n of nodes) {
      let g = nodeEls.get(n.id);
      if (!g) {
        g = el('g', { class: 'gnb-node' }, nodeLayer);
        g.dataset.peerId = n.id;
        el('circle', { r: 12 }, g);
        el('text', { x: 16, y: 4 }, g);
        el('title', {}, g);
        nodeEls.set(n.id, g);
      }
      g.classList.toggle('gnb-self', n.isSelf);
      g.querySelector('text').textContent = n.label + (n.isSelf ? ' (this kernel)' : '');
      const lines = [n.id, n.devices && `devices: ${n.devices}`,
        n.services.length ? `services: ${n.services.join(', ')}` : '',
        n.layers ? `layers: ${n.layers[0]}–${n.layers[1]}` : ''];
      g.querySelector('title').textContent = lines.filter(Boolean).join('\n');
    }
    const keys = new Set(links.map(l => l.key));
    for (const [key, els] of edgeEls) {
      if (!keys.has(key)) {
        els.line.remove();
        els.label.remove();
        edgeEls.delete(key);
      }
    }
    for (const l of links) {
      let els = edgeEls.get(l.key);
      if (!els) {
        els = { line: el('line', { 'stroke-width': 2 }, edgeLayer), label: el('text', { class: 'gnb-edge-label', 'text-anchor': 'middle' }, labelLayer) };
        els.line.dataset.linkKey = l.key;
        edgeEls.set(l.key, els);
      }
      els.line.setAttribute('stroke', l.relayed ? RELAYED : DIRECT);
      if (l.relayed) {
        els.line.setAttribute('stroke-dasharray', '6 4');
      } else {
        els.line.removeAttribute('stroke-dasharray');
      }
      els.line.dataset.relayed = String(l.relayed);
      els.label.textContent = l.label;
    }
    box.dataset.peerCount = String(nodes.length);
    caption.textContent = summary(graph);

    simulation.nodes(nodes);
    simulation.force('link').links(links);
    // Reheat gently when only data changed; harder when peers came or went.
    const moved = merged.added.length + merged.removed.length > 0;
    simulation.alpha(moved ? 0.8 : Math.max(simulation.alpha(), 0.05)).restart();
    draw();
  }

  const onHeight = () => {
    height = model.get('height') || 360;
    size();
    simulation.force('center', forceCenter(width / 2, height / 2)).alpha(0.3).restart();
  };
  model.on('change:snapshot', update);
  model.on('change:height', onHeight);
  update();

  return () => {
    simulation.stop();
    model.off('change:snapshot', update);
    model.off('change:height', onHeight);
  };
}

export default { render };
