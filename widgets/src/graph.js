// Mesh snapshot -> graph of nodes and edges, and the merge that keeps node positions
// across snapshots. Pure (no DOM, no d3), so it is unit-tested with node:test.

/** @typedef {{id: string, label: string, shortId: string, isSelf: boolean, services: string[],
 *   devices: string, layers: [number, number] | null, x?: number, y?: number,
 *   vx?: number, vy?: number}} GraphNode */
/** @typedef {{key: string, source: string, target: string, type: string, relayed: boolean,
 *   rttMs: number | null, label: string}} GraphEdge */

export function shortId(id) {
  return id.length > 8 ? id.slice(0, 8) : id;
}

export function formatRtt(ms) {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) {
    return '';
  }
  return ms < 10 ? `${ms.toFixed(2)} ms` : `${ms.toFixed(1)} ms`;
}

function formatDevices(devices) {
  if (!Array.isArray(devices)) {
    return '';
  }
  return devices
    .filter(d => d && typeof d === 'object')
    .map(d => [d.kind, d.name].filter(s => typeof s === 'string' && s).join(' '))
    .join(', ');
}

/** Key of an undirected link: the same whichever end reported it. */
export function edgeKey(a, b) {
  return a < b ? `${a}|${b}` : `${b}|${a}`;
}

/**
 * Nodes and edges of a snapshot. Malformed entries are skipped, duplicate peers and links
 * collapse to one, and links to peers the snapshot does not list are dropped (the force
 * layout cannot place an edge without both ends).
 * @returns {{joined: boolean, mesh: string, self: string, nodes: GraphNode[], edges: GraphEdge[]}}
 */
export function snapshotToGraph(snapshot) {
  if (!snapshot || typeof snapshot !== 'object' || snapshot.joined !== true) {
    return { joined: false, mesh: '', self: '', nodes: [], edges: [] };
  }
  const self = typeof snapshot.self === 'string' ? snapshot.self : '';
  const nodes = [];
  const ids = new Set();
  for (const p of Array.isArray(snapshot.peers) ? snapshot.peers : []) {
    if (!p || typeof p.id !== 'string' || !p.id || ids.has(p.id)) {
      continue;
    }
    ids.add(p.id);
    const layers =
      Array.isArray(p.layers) && p.layers.length === 2 && p.layers.every(n => typeof n === 'number')
        ? [p.layers[0], p.layers[1]]
        : null;
    nodes.push({
      id: p.id,
      label: typeof p.name === 'string' && p.name ? p.name : shortId(p.id),
      shortId: shortId(p.id),
      isSelf: p.id === self,
      services: Array.isArray(p.services) ? p.services.filter(s => typeof s === 'string') : [],
      devices: formatDevices(p.devices),
      layers
    });
  }
  const edges = [];
  const seen = new Set();
  for (const l of Array.isArray(snapshot.links) ? snapshot.links : []) {
    if (!l || typeof l.a !== 'string' || typeof l.b !== 'string' || l.a === l.b) {
      continue;
    }
    if (!ids.has(l.a) || !ids.has(l.b)) {
      continue;
    }
    const key = edgeKey(l.a, l.b);
    if (seen.has(key)) {
      continue;
    }
    seen.add(key);
    const type = typeof l.type === 'string' ? l.type : '?';
    const rttMs = typeof l.rtt_ms === 'number' && Number.isFinite(l.rtt_ms) ? l.rtt_ms : null;
    edges.push({
      key,
      source: l.a,
      target: l.b,
      type,
      relayed: l.relayed === true || type === 'relay',
      rttMs,
      label: formatRtt(rttMs)
    });
  }
  return { joined: true, mesh: typeof snapshot.mesh === 'string' ? snapshot.mesh : '', self, nodes, edges };
}

/** A position that depends only on the id, so a new peer lands in the same place every run. */
export function seededPosition(id, width, height) {
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) {
    h ^= id.charCodeAt(i);
    h = Math.imul(h, 16777619) >>> 0;
  }
  const angle = ((h & 0xffff) / 0x10000) * 2 * Math.PI;
  const radius = (0.15 + ((h >>> 16) / 0x10000) * 0.2) * Math.min(width, height);
  return { x: width / 2 + radius * Math.cos(angle), y: height / 2 + radius * Math.sin(angle) };
}

/**
 * The node objects for the next layout step. A peer that stays keeps its node object, and with
 * it the position and velocity the simulation gave it, so the picture does not jump when a
 * peer comes or goes; its data is refreshed. A new peer starts next to a peer it links to (it
 * then drifts into place), or at a seeded spot around the centre when it has none.
 * @param {GraphNode[]} previous the node objects the simulation holds now
 * @param {{nodes: GraphNode[], edges: GraphEdge[]}} graph from snapshotToGraph
 * @returns {{nodes: GraphNode[], added: string[], removed: string[], kept: string[]}}
 */
export function mergeNodes(previous, graph, width, height) {
  const old = new Map(previous.map(n => [n.id, n]));
  const placed = new Map();
  const added = [];
  const kept = [];
  for (const next of graph.nodes) {
    const node = old.get(next.id);
    if (node) {
      Object.assign(node, next);
      placed.set(node.id, node);
      kept.push(node.id);
    }
  }
  const neighbours = new Map();
  for (const e of graph.edges) {
    for (const [a, b] of [[e.source, e.target], [e.target, e.source]]) {
      if (!neighbours.has(a)) neighbours.set(a, []);
      neighbours.get(a).push(b);
    }
  }
  const nodes = [];
  for (const next of graph.nodes) {
    let node = placed.get(next.id);
    if (!node) {
      const seed = seededPosition(next.id, width, height);
      const anchor = (neighbours.get(next.id) || []).map(id => placed.get(id)).find(Boolean);
      const pos = anchor && typeof anchor.x === 'number'
        // Offset from the anchor by the seeded direction, so two newcomers do not overlap.
        ? { x: anchor.x + (seed.x - width / 2) * 0.3, y: anchor.y + (seed.y - height / 2) * 0.3 }
        : seed;
      node = { ...next, x: pos.x, y: pos.y, vx: 0, vy: 0 };
      placed.set(node.id, node);
      added.push(node.id);
    }
    nodes.push(node);
  }
  const ids = new Set(graph.nodes.map(n => n.id));
  const removed = previous.map(n => n.id).filter(id => !ids.has(id));
  return { nodes, added, removed, kept };
}

/** Edges whose ends are node objects, as d3-force's link force wants them. */
export function resolveEdges(nodes, edges) {
  const byId = new Map(nodes.map(n => [n.id, n]));
  return edges
    .filter(e => byId.has(e.source) && byId.has(e.target))
    .map(e => ({ ...e, source: byId.get(e.source), target: byId.get(e.target) }));
}

/** One line under the graph: "mesh default: 3 peers, 2 links (1 relayed)". */
export function summary(graph) {
  if (!graph.joined) {
    return 'This kernel has not joined a mesh — run %mesh join';
  }
  const n = graph.nodes.length;
  const m = graph.edges.length;
  const relayed = graph.edges.filter(e => e.relayed).length;
  return `mesh ${graph.mesh || '—'}: ${n} ${n === 1 ? 'peer' : 'peers'}, ${m} ${m === 1 ? 'link' : 'links'}` +
    (relayed ? ` (${relayed} relayed)` : '');
}
