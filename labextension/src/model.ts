/**
 * The mesh snapshot the kernel sends, checked and turned into table rows.
 *
 * Pure: no JupyterLab or DOM imports, so it is unit-tested in plain node.
 */

export interface IDevice {
  kind: string;
  name: string;
  memory_bytes: number | null;
}

export interface IPeer {
  id: string;
  name: string;
  devices: IDevice[];
  free_memory_bytes: number | null;
  tflops: number | null;
  services: string[];
  layers: [number, number] | null;
  last_seen: number | null;
  /** The user's peer id when the kernel certificate checked out (a kernel peer), else null. */
  user: string | null;
}

/** How a link carries its frames (gradient_nb/mesh: ``LinkStats.kind``). */
export type LinkKind = 'direct-tcp' | 'webrtc-direct' | 'webrtc-relay' | string;

export interface ILink {
  a: string;
  b: string;
  kind: LinkKind;
  /** The ICE candidate type of the far end (host, srflx, prflx, relay); host for a direct-tcp link. */
  type: string;
  relayed: boolean;
  rtt_ms: number | null;
  bytes_sent: number;
  bytes_received: number;
}

export interface IJoinedSnapshot {
  joined: true;
  mesh: string;
  self: string;
  rendezvous: string;
  peers: IPeer[];
  links: ILink[];
}

export interface INotJoinedSnapshot {
  joined: false;
  /** Set when the kernel could not read its mesh state. */
  error?: string;
}

export type MeshSnapshot = IJoinedSnapshot | INotJoinedSnapshot;

export const NOT_JOINED: INotJoinedSnapshot = { joined: false };

type Obj = Record<string, unknown>;

function isObj(value: unknown): value is Obj {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function str(value: unknown, fallback = ''): string {
  return typeof value === 'string' ? value : fallback;
}

function num(value: unknown): number | null {
  return typeof value === 'number' && Number.isFinite(value) ? value : null;
}

function list(value: unknown): unknown[] {
  return Array.isArray(value) ? value : [];
}

function parseDevice(raw: unknown): IDevice | null {
  if (!isObj(raw)) {
    return null;
  }
  return {
    kind: str(raw.kind, '?'),
    name: str(raw.name),
    memory_bytes: num(raw.memory_bytes)
  };
}

function parseLayers(raw: unknown): [number, number] | null {
  if (!Array.isArray(raw) || raw.length !== 2) {
    return null;
  }
  const [start, end] = [num(raw[0]), num(raw[1])];
  return start === null || end === null ? null : [start, end];
}

function parsePeer(raw: unknown): IPeer | null {
  if (!isObj(raw) || typeof raw.id !== 'string' || raw.id === '') {
    return null;
  }
  return {
    id: raw.id,
    name: str(raw.name),
    devices: list(raw.devices)
      .map(parseDevice)
      .filter((d): d is IDevice => d !== null),
    free_memory_bytes: num(raw.free_memory_bytes),
    tflops: num(raw.tflops),
    services: list(raw.services).filter((s): s is string => typeof s === 'string'),
    layers: parseLayers(raw.layers),
    last_seen: num(raw.last_seen),
    user: typeof raw.user === 'string' && raw.user !== '' ? raw.user : null
  };
}

function parseLink(raw: unknown): ILink | null {
  if (!isObj(raw) || typeof raw.a !== 'string' || typeof raw.b !== 'string') {
    return null;
  }
  const type = str(raw.type, '?');
  // A TURN-relayed pair is relayed whatever the flag says.
  const relayed = raw.relayed === true || type === 'relay' || raw.kind === 'webrtc-relay';
  return {
    a: raw.a,
    b: raw.b,
    // A kernel from before direct TCP links sends no kind: every link it had was WebRTC.
    kind: typeof raw.kind === 'string' && raw.kind !== '' ? raw.kind : relayed ? 'webrtc-relay' : 'webrtc-direct',
    type,
    relayed,
    rtt_ms: num(raw.rtt_ms),
    bytes_sent: num(raw.bytes_sent) ?? 0,
    bytes_received: num(raw.bytes_received) ?? 0
  };
}

/**
 * Check a snapshot from the kernel. Anything malformed is dropped rather than thrown:
 * the kernel and the extension may be different versions, and the panel must still show
 * what it can.
 */
export function parseSnapshot(raw: unknown): MeshSnapshot {
  if (!isObj(raw) || raw.joined !== true) {
    const error = isObj(raw) && typeof raw.error === 'string' ? raw.error : undefined;
    return error ? { joined: false, error } : { joined: false };
  }
  const peers: IPeer[] = [];
  const seen = new Set<string>();
  for (const p of list(raw.peers)) {
    const peer = parsePeer(p);
    if (peer && !seen.has(peer.id)) {
      seen.add(peer.id);
      peers.push(peer);
    }
  }
  return {
    joined: true,
    mesh: str(raw.mesh),
    self: str(raw.self),
    rendezvous: str(raw.rendezvous),
    peers,
    links: list(raw.links)
      .map(parseLink)
      .filter((l): l is ILink => l !== null)
  };
}

// ---------------------------------------------------------------- formatting

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

export function formatBytes(bytes: number | null): string {
  if (bytes === null || bytes < 0) {
    return '—';
  }
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits)} ${UNITS[unit]}`;
}

export function formatRtt(ms: number | null): string {
  if (ms === null) {
    return '—';
  }
  return ms < 10 ? `${ms.toFixed(2)} ms` : `${ms.toFixed(1)} ms`;
}

/** Peer ids derive from public keys and are long; 8 characters tell peers of one mesh apart. */
export function shortId(id: string): string {
  return id.length > 8 ? id.slice(0, 8) : id;
}

export function formatDevices(devices: IDevice[]): string {
  if (devices.length === 0) {
    return '—';
  }
  // "2× cuda NVIDIA H100 (79.6 GiB)" reads better than the same device listed twice.
  const counts = new Map<string, number>();
  for (const d of devices) {
    const label = [d.kind, d.name].filter(Boolean).join(' ') +
      (d.memory_bytes !== null ? ` (${formatBytes(d.memory_bytes)})` : '');
    counts.set(label, (counts.get(label) ?? 0) + 1);
  }
  return [...counts.entries()].map(([label, n]) => (n > 1 ? `${n}× ${label}` : label)).join(', ');
}

export function formatLayers(layers: [number, number] | null): string {
  return layers === null ? '—' : `${layers[0]}–${layers[1]}`;
}

// ---------------------------------------------------------------- rows

export interface IPeerRow {
  key: string;
  isSelf: boolean;
  cells: {
    name: string;
    id: string;
    devices: string;
    services: string;
    layers: string;
  };
  /** Longer text for a tooltip: full id, free memory, measured throughput. */
  title: string;
}

export interface ILinkRow {
  key: string;
  relayed: boolean;
  kind: LinkKind;
  cells: {
    peers: string;
    /** direct-tcp, webrtc-direct or webrtc-relay: the transport and whether a TURN server relays it. */
    kind: string;
    type: string;
    rtt: string;
  };
  title: string;
}

/** The kernel's own peer first, then by name, then id, so rows do not jump between snapshots. */
export function peerRows(snapshot: MeshSnapshot): IPeerRow[] {
  if (!snapshot.joined) {
    return [];
  }
  const peers = [...snapshot.peers].sort((x, y) => {
    const selfOrder = Number(y.id === snapshot.self) - Number(x.id === snapshot.self);
    return selfOrder || x.name.localeCompare(y.name) || x.id.localeCompare(y.id);
  });
  return peers.map(p => {
    const isSelf = p.id === snapshot.self;
    const tflops = p.tflops === null ? '—' : `${p.tflops.toFixed(2)} TFLOP/s`;
    return {
      key: p.id,
      isSelf,
      cells: {
        name: (p.name || shortId(p.id)) + (isSelf ? ' (this kernel)' : ''),
        id: shortId(p.id),
        devices: formatDevices(p.devices),
        services: p.services.length ? p.services.join(', ') : '—',
        layers: formatLayers(p.layers)
      },
      title:
        `${p.id}\n` +
        (p.user ? `kernel of user ${p.user}\n` : '') +
        `free memory: ${formatBytes(p.free_memory_bytes)}\nmeasured: ${tflops}`
    };
  });
}

/** A link is one row whichever end reported it; its key does not depend on the order of a and b. */
export function linkKey(a: string, b: string): string {
  return a < b ? `${a}|${b}` : `${b}|${a}`;
}

const KIND_TITLES: Record<string, string> = {
  'direct-tcp': 'direct TCP + TLS 1.3 link (a peer dialed the other’s address)',
  'webrtc-direct': 'WebRTC link, peer to peer (ICE found a direct path)',
  'webrtc-relay': 'WebRTC link relayed by a TURN server (no direct path between the NATs)'
};

export function linkRows(snapshot: MeshSnapshot): ILinkRow[] {
  if (!snapshot.joined) {
    return [];
  }
  const names = new Map(snapshot.peers.map(p => [p.id, p.name || shortId(p.id)]));
  const label = (id: string) => names.get(id) ?? shortId(id);
  const rows = new Map<string, ILinkRow>();
  for (const l of snapshot.links) {
    const key = linkKey(l.a, l.b);
    if (rows.has(key)) {
      continue;
    }
    rows.set(key, {
      key,
      relayed: l.relayed,
      kind: l.kind,
      cells: {
        peers: `${label(l.a)} ↔ ${label(l.b)}`,
        kind: l.kind,
        type: l.type,
        rtt: formatRtt(l.rtt_ms)
      },
      title:
        `${KIND_TITLES[l.kind] ?? l.kind}\n` +
        `sent ${formatBytes(l.bytes_sent)}, received ${formatBytes(l.bytes_received)}`
    });
  }
  return [...rows.values()].sort((x, y) => x.cells.peers.localeCompare(y.cells.peers));
}

export function peerCount(snapshot: MeshSnapshot): number {
  return snapshot.joined ? snapshot.peers.length : 0;
}

export function statusText(snapshot: MeshSnapshot | null): string {
  if (snapshot === null || !snapshot.joined) {
    return 'Mesh: not joined';
  }
  const n = snapshot.peers.length;
  return `Mesh: ${n} ${n === 1 ? 'peer' : 'peers'}`;
}

export const NOT_JOINED_MESSAGE =
  'This kernel has not joined a mesh — Join… above (or “gradient-nb: Join a Mesh…”, or %mesh join)';
export const NO_KERNEL_MESSAGE = 'No notebook kernel. ' + NOT_JOINED_MESSAGE;

// ---------------------------------------------------------------- diffing

export interface IRowDiff<R> {
  added: R[];
  removed: string[];
  changed: R[];
  /** Keys in their new order. */
  order: string[];
}

/** What changed between two lists of keyed rows; rows compared by their JSON. */
export function diffRows<R extends { key: string }>(previous: R[], next: R[]): IRowDiff<R> {
  const before = new Map(previous.map(r => [r.key, JSON.stringify(r)]));
  const nextKeys = new Set(next.map(r => r.key));
  const added: R[] = [];
  const changed: R[] = [];
  for (const row of next) {
    const old = before.get(row.key);
    if (old === undefined) {
      added.push(row);
    } else if (old !== JSON.stringify(row)) {
      changed.push(row);
    }
  }
  const removed = previous.map(r => r.key).filter(k => !nextKeys.has(k));
  return { added, removed, changed, order: next.map(r => r.key) };
}
