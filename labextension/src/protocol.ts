/**
 * The front-end end of the "gradient_nb.mesh" comm (see gradient_nb/notebook/comm.py).
 *
 * Works on a small comm interface rather than JupyterLab's IComm so it can be tested with a
 * fake; JupyterLab's IComm satisfies it.
 */

import { MeshSnapshot, parseSnapshot } from './model';

export const TARGET_NAME = 'gradient_nb.mesh';

/** Joining waits on signaling and ICE; the kernel gives up after 60 s, the panel a bit later. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 75_000;

export interface ICommMessage {
  content: { data: unknown };
}

export interface ICommLike {
  readonly isDisposed?: boolean;
  onMsg: (msg: ICommMessage) => void | PromiseLike<void>;
  onClose: (msg: ICommMessage) => void | PromiseLike<void>;
  open(data?: any): unknown;
  send(data: any): unknown;
  close(data?: any): unknown;
}

export type RequestKind = 'snapshot' | 'join' | 'leave' | 'share' | 'open';

export interface IReply {
  ok: boolean;
  error: string;
  /** The share code (a `share` request's reply). */
  code?: string;
  /** The shared notebook's path in this server (an `open` request's reply). */
  path?: string;
}

export type KernelMessage =
  | { type: 'snapshot'; snapshot: MeshSnapshot }
  | ({ type: 'reply'; request: string; id: unknown } & IReply)
  | { type: 'unknown' };

export function parseKernelMessage(data: unknown): KernelMessage {
  if (typeof data !== 'object' || data === null) {
    return { type: 'unknown' };
  }
  const d = data as Record<string, unknown>;
  if (d.type === 'snapshot') {
    return { type: 'snapshot', snapshot: parseSnapshot(d.snapshot) };
  }
  if (d.type === 'reply') {
    const reply: KernelMessage = {
      type: 'reply',
      request: typeof d.request === 'string' ? d.request : '',
      id: d.id,
      ok: d.ok === true,
      error: typeof d.error === 'string' ? d.error : ''
    };
    for (const key of ['code', 'path'] as const) {
      if (typeof d[key] === 'string') {
        reply[key] = d[key] as string;
      }
    }
    return reply;
  }
  return { type: 'unknown' };
}

export interface IChannelHandlers {
  onSnapshot(snapshot: MeshSnapshot): void;
  /** The comm closed: by the kernel (no such target, kernel died) or by dispose(). */
  onClose(gotSnapshot: boolean): void;
}

interface IPending {
  resolve(reply: IReply): void;
  timer: ReturnType<typeof setTimeout>;
}

/**
 * One open comm: delivers snapshots, pairs requests with replies by id, and fails every
 * request still waiting when the comm goes away, so no promise is left hanging.
 */
export class MeshChannel {
  private _nextId = 1;
  private _pending = new Map<number, IPending>();
  private _closed = false;
  private _gotSnapshot = false;

  constructor(
    private readonly _comm: ICommLike,
    private readonly _handlers: IChannelHandlers,
    private readonly _timeoutMs = DEFAULT_REQUEST_TIMEOUT_MS
  ) {
    _comm.onMsg = msg => this._onMsg(msg.content.data);
    _comm.onClose = () => this._onClosed();
  }

  get isClosed(): boolean {
    return this._closed;
  }

  /** True once the kernel has answered with at least one snapshot. */
  get gotSnapshot(): boolean {
    return this._gotSnapshot;
  }

  open(): void {
    this._comm.open({});
  }

  request(kind: RequestKind, payload: Record<string, unknown> = {}): Promise<IReply> {
    if (this._closed) {
      return Promise.resolve({ ok: false, error: 'no connection to the kernel' });
    }
    const id = this._nextId++;
    return new Promise<IReply>(resolve => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        resolve({ ok: false, error: `no reply from the kernel to ${kind}` });
      }, this._timeoutMs);
      this._pending.set(id, { resolve, timer });
      try {
        this._comm.send({ ...payload, request: kind, id });
      } catch (err) {
        this._settle(id, { ok: false, error: String(err) });
      }
    });
  }

  dispose(): void {
    if (this._closed) {
      return;
    }
    try {
      if (!this._comm.isDisposed) {
        this._comm.close();
      }
    } catch {
      // The kernel may already be gone; the comm is dead either way.
    }
    this._onClosed();
  }

  private _settle(id: number, reply: IReply): void {
    const pending = this._pending.get(id);
    if (pending) {
      clearTimeout(pending.timer);
      this._pending.delete(id);
      pending.resolve(reply);
    }
  }

  private _onMsg(data: unknown): void {
    if (this._closed) {
      return;
    }
    const msg = parseKernelMessage(data);
    if (msg.type === 'snapshot') {
      this._gotSnapshot = true;
      this._handlers.onSnapshot(msg.snapshot);
    } else if (msg.type === 'reply' && typeof msg.id === 'number') {
      const { ok, error, code, path } = msg;
      this._settle(msg.id, {
        ok,
        error,
        ...(code !== undefined ? { code } : {}),
        ...(path !== undefined ? { path } : {})
      });
    }
  }

  private _onClosed(): void {
    if (this._closed) {
      return;
    }
    this._closed = true;
    for (const id of [...this._pending.keys()]) {
      this._settle(id, { ok: false, error: 'the connection to the kernel closed' });
    }
    this._handlers.onClose(this._gotSnapshot);
  }
}
