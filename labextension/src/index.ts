/**
 * JupyterLab glue: the Mesh side panel, the status-bar item and the join/leave commands.
 * The logic lives in model.ts, protocol.ts, connection.ts and view.ts.
 */

import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, InputDialog, showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { IKernelLike, MeshConnection } from './connection';
import { statusText } from './model';
import { MeshView } from './view';

export const PANEL_ID = 'gradient-nb-mesh-panel';

export namespace CommandIDs {
  export const join = 'gradient-nb:join';
  export const leave = 'gradient-nb:leave';
  export const showPanel = 'gradient-nb:show-mesh';
}

const meshIcon = new LabIcon({
  name: 'gradient-nb:mesh',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161" stroke="#616161" stroke-width="1.5">' +
    '<line x1="5" y1="6" x2="19" y2="6"/><line x1="5" y1="6" x2="12" y2="19"/>' +
    '<line x1="19" y1="6" x2="12" y2="19"/><line x1="5" y1="6" x2="12" y2="12"/>' +
    '<line x1="19" y1="6" x2="12" y2="12"/><line x1="12" y1="12" x2="12" y2="19"/>' +
    '<circle cx="5" cy="6" r="2.5"/><circle cx="19" cy="6" r="2.5"/>' +
    '<circle cx="12" cy="19" r="2.5"/><circle cx="12" cy="12" r="2"/></g></svg>'
});

class MeshPanel extends Widget {
  readonly view: MeshView;

  constructor(private readonly _connection: MeshConnection) {
    super();
    this.id = PANEL_ID;
    this.addClass('gnb-MeshPanel');
    this.title.icon = meshIcon;
    this.title.caption = 'Mesh';
    this.view = new MeshView(this.node);
    _connection.changed.connect(this._update, this);
    this._update();
  }

  private _update(): void {
    this.view.render(this._connection.state, this._connection.snapshot);
  }

  dispose(): void {
    this._connection.changed.disconnect(this._update, this);
    super.dispose();
  }
}

class MeshStatus extends Widget {
  constructor(private readonly _connection: MeshConnection) {
    super();
    this.addClass('gnb-MeshStatus');
    this.node.title = 'Peers in the mesh of the current notebook’s kernel';
    _connection.changed.connect(this._update, this);
    this._update();
  }

  private _update(): void {
    const snapshot = this._connection.snapshot;
    this.node.textContent = statusText(snapshot);
    this.node.dataset.peerCount = String(snapshot && snapshot.joined ? snapshot.peers.length : 0);
  }

  dispose(): void {
    this._connection.changed.disconnect(this._update, this);
    super.dispose();
  }
}

/** Follows the current notebook's kernel: notebook switches, kernel changes, new sessions. */
function followCurrentKernel(tracker: INotebookTracker, connection: MeshConnection): void {
  let watched: NotebookPanel | null = null;
  const sync = () => {
    const kernel = watched?.sessionContext.session?.kernel ?? null;
    connection.setKernel(kernel as unknown as IKernelLike | null);
  };
  const watch = (panel: NotebookPanel | null) => {
    if (watched) {
      watched.sessionContext.kernelChanged.disconnect(sync);
      watched.sessionContext.sessionChanged.disconnect(sync);
      watched.disposed.disconnect(onDisposed);
    }
    watched = panel;
    if (panel) {
      panel.sessionContext.kernelChanged.connect(sync);
      panel.sessionContext.sessionChanged.connect(sync);
      panel.disposed.connect(onDisposed);
    }
    sync();
  };
  const onDisposed = () => watch(tracker.currentWidget);
  tracker.currentChanged.connect((_, panel) => watch(panel));
  watch(tracker.currentWidget);
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'gradient-nb-labextension:plugin',
  description: 'Shows the peers and links of the notebook kernel’s gradient-nb mesh.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, IStatusBar, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null
  ) => {
    const connection = new MeshConnection();
    const panel = new MeshPanel(connection);
    app.shell.add(panel, 'left', { rank: 900 });
    followCurrentKernel(tracker, connection);

    app.commands.addCommand(CommandIDs.join, {
      label: 'Mesh: Join a Mesh…',
      caption: 'Join the current notebook’s kernel to a gradient-nb mesh',
      execute: async () => {
        const url = await InputDialog.getText({
          title: 'Join a mesh',
          label: 'Rendezvous URL',
          placeholder: 'ws://host:port'
        });
        if (!url.button.accept || !url.value?.trim()) {
          return;
        }
        const name = await InputDialog.getText({
          title: 'Join a mesh',
          label: 'Name of this peer (optional)',
          placeholder: ''
        });
        if (!name.button.accept) {
          return;
        }
        const reply = await connection.request('join', {
          url: url.value.trim(),
          name: name.value?.trim() || null
        });
        if (!reply.ok) {
          await showErrorMessage('Could not join the mesh', reply.error);
        }
      }
    });
    app.commands.addCommand(CommandIDs.leave, {
      label: 'Mesh: Leave the Mesh',
      caption: 'Leave the mesh the current notebook’s kernel has joined',
      isEnabled: () => connection.snapshot?.joined === true,
      execute: async () => {
        const reply = await connection.request('leave');
        if (!reply.ok) {
          await showErrorMessage('Could not leave the mesh', reply.error);
        }
      }
    });
    app.commands.addCommand(CommandIDs.showPanel, {
      label: 'Mesh: Show Mesh Panel',
      execute: () => {
        if (labShell) {
          labShell.activateById(PANEL_ID);
        } else {
          app.shell.activateById(PANEL_ID);
        }
      }
    });
    connection.changed.connect(() => app.commands.notifyCommandChanged(CommandIDs.leave));

    if (palette) {
      for (const command of [CommandIDs.join, CommandIDs.leave, CommandIDs.showPanel]) {
        palette.addItem({ command, category: 'Mesh' });
      }
    }

    if (statusBar) {
      const status = new MeshStatus(connection);
      status.node.addEventListener('click', () => app.commands.execute(CommandIDs.showPanel));
      statusBar.registerStatusItem('gradient-nb:mesh-status', {
        item: status,
        align: 'left',
        rank: 900
      });
    }
  }
};

export default plugin;
