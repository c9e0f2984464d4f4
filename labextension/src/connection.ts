/**
 * Keeps one mesh comm open to whichever kernel the panel follows, across kernel changes
 * and restarts.
 *
 * Depends only on a small kernel interface (JupyterLab's IKernelConnection satisfies it), so
 * the re-opening rules are tested with a fake kernel.
 */

import { ISignal, Signal } from '@lumino/signaling';

import { MeshSnapshot } from './model';
import { ICommLike, IReply, MeshChannel, RequestKind, TARGET_NAME } from './protocol';

export interface IKernelLike {
  readonly isDisposed: boolean;
  readonly status: string;
  readonly statusChanged: ISignal<any, string>;
  readonly iopubMessage: ISignal<any, { header: { msg_type: string } }>;
  createComm(targetName: string): ICommLike;
}

/** Kernel states in which a comm cannot be opened; comms die with the process. */
const DOWN = new Set(['dead', 'restarting', 'autorestarting', 'terminating']);

export type ConnectionState =
  /** No kernel to talk to. */
  | 'no-kernel'
  /** Comm open sent, no snapshot yet. */
  | 'connecting'
  /** Snapshots arriving. */
  | 'connected'
  /** The kernel has no gradient_nb.mesh target (gradient-nb not installed there) or is down. */
  | 'unavailable';

export class MeshConnection {
  private _kernel: IKernelLike | null = null;
  private _channel: MeshChannel | null = null;
  private _snapshot: MeshSnapshot | null = null;
  private _state: ConnectionState = 'no-kernel';
  /** Open a comm at the kernel's next idle. */
  private _wantOpen = false;
  private _changed = new Signal<this, void>(this);
  private _disposed = false;
  private _generation = 0;

  /** Fires whenever the snapshot or the state changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The latest snapshot, or null when there is none (no kernel, no comm). */
  get snapshot(): MeshSnapshot | null {
    return this._snapshot;
  }

  get state(): ConnectionState {
    return this._state;
  }

  get kernel(): IKernelLike | null {
    return this._kernel;
  }

  /** Counts the kernel's restarts seen (each a fresh process that has joined nothing). */
  get generation(): number {
    return this._generation;
  }

  setKernel(kernel: IKernelLike | null): void {
    if (kernel === this._kernel || this._disposed) {
      return;
    }
    if (this._kernel) {
      this._kernel.statusChanged.disconnect(this._onStatus, this);
      this._kernel.iopubMessage.disconnect(this._onIopub, this);
    }
    this._dropChannel();
    this._kernel = kernel;
    this._snapshot = null;
    if (!kernel || kernel.isDisposed) {
      this._kernel = null;
      this._setState('no-kernel');
      return;
    }
    kernel.statusChanged.connect(this._onStatus, this);
    kernel.iopubMessage.connect(this._onIopub, this);
    this._wantOpen = true;
    this._setState('unavailable');
    if (!DOWN.has(kernel.status)) {
      this._open();
    }
  }

  async request(kind: RequestKind, payload: Record<string, unknown> = {}): Promise<IReply> {
    if (!this._kernel) {
      return { ok: false, error: 'no notebook kernel' };
    }
    if (!this._channel || this._channel.isClosed || !this._channel.gotSnapshot) {
      return {
        ok: false,
        error:
          this._state === 'connecting'
            ? 'the kernel has not answered yet; try again when it is idle'
            : 'the kernel does not answer the gradient_nb.mesh comm: is gradient-nb installed in ' +
              'the kernel’s environment?'
      };
    }
    return this._channel.request(kind, payload);
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this.setKernel(null);
    this._disposed = true;
    Signal.clearData(this);
  }

  private _open(): void {
    const kernel = this._kernel;
    if (!kernel || kernel.isDisposed) {
      return;
    }
    this._wantOpen = false;
    let comm: ICommLike;
    try {
      comm = kernel.createComm(TARGET_NAME);
    } catch {
      this._setState('unavailable');
      return;
    }
    const channel: MeshChannel = new MeshChannel(comm, {
      onSnapshot: snapshot => {
        if (channel !== this._channel) {
          return;
        }
        this._snapshot = snapshot;
        this._state = 'connected';
        this._changed.emit();
      },
      onClose: gotSnapshot => {
        if (channel !== this._channel) {
          return;
        }
        this._channel = null;
        this._snapshot = null;
        // A comm that worked and was closed by the kernel (the extension re-registered its
        // target, say) comes back at once; one that never answered waits for a cell to run,
        // since only code can register the target, and retrying on every idle would ping the
        // kernel forever.
        this._wantOpen = gotSnapshot;
        this._setState('unavailable', true);
      }
    });
    this._channel = channel;
    this._setState('connecting');
    channel.open();
  }

  private _dropChannel(): void {
    const channel = this._channel;
    this._channel = null;
    channel?.dispose();
  }

  private _onStatus(_: unknown, status: string): void {
    if (DOWN.has(status)) {
      if (this._channel || this._state !== 'unavailable') {
        this._generation += 1;
      }
      this._dropChannel();
      this._snapshot = null;
      this._wantOpen = true;
      this._setState('unavailable', true);
    } else if (status === 'idle' && this._wantOpen && !this._channel) {
      this._open();
    }
  }

  private _onIopub(_: unknown, msg: { header: { msg_type: string } }): void {
    if (msg.header.msg_type === 'execute_input' && !this._channel) {
      this._wantOpen = true;
    }
  }

  private _setState(state: ConnectionState, force = false): void {
    if (state !== this._state || force) {
      this._state = state;
      this._changed.emit();
    }
  }
}
