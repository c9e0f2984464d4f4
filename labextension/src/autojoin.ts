/**
 * Auto-join: with the setting on, each kernel the panel reaches joins the mesh once, by itself.
 *
 * "Once" is per kernel connection: a kernel that left (Leave, %mesh leave) is not pulled back in,
 * a restarted kernel (a new process, a new comm) joins again, and a refused join is reported, not
 * retried in a loop. Depends only on MeshConnection's signal and request, so it is tested with the
 * fake kernel.
 */

import { MeshConnection } from './connection';
import { IReply } from './protocol';
import { IMeshSettings, joinPayload } from './settings';

export class AutoJoiner {
  /** Kernel objects (and their restarts) already asked to join. */
  private _asked = new WeakMap<object, number>();
  private _disposed = false;

  constructor(
    private readonly _connection: MeshConnection,
    private readonly _settings: () => IMeshSettings,
    private readonly _name: () => string | null,
    private readonly _onError: (error: string) => void
  ) {
    _connection.changed.connect(this.check, this);
  }

  /** Joins when the setting is on, a URL is set, and this kernel's comm says it has not joined yet. */
  check(): void {
    const conn = this._connection;
    const kernel = conn.kernel;
    const settings = this._settings();
    if (this._disposed || !kernel || !settings.autoJoin || !settings.rendezvousUrl) {
      return;
    }
    if (conn.state !== 'connected' || !conn.snapshot || conn.snapshot.joined) {
      return;
    }
    // A restart gives the kernel a new comm: the generation tells a new process from the same one.
    const generation = conn.generation;
    if (this._asked.get(kernel) === generation) {
      return;
    }
    this._asked.set(kernel, generation);
    void conn
      .request('join', joinPayload(settings, settings.rendezvousUrl, this._name()))
      .then((reply: IReply) => {
        if (!reply.ok) {
          this._onError(reply.error);
        }
      });
  }

  dispose(): void {
    this._disposed = true;
    this._connection.changed.disconnect(this.check, this);
  }
}
