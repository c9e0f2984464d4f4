/**
 * JupyterLab glue: the Mesh side panel, the status-bar item, the join/leave and share/open-shared commands
 * (listed in the palette under "gradient-nb"), the settings and auto-join. The logic lives in model.ts,
 * protocol.ts, connection.ts, view.ts, settings.ts, share.ts and autojoin.ts.
 */

import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import {
  Clipboard,
  Dialog,
  ICommandPalette,
  InputDialog,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { AutoJoiner } from './autojoin';
import { IKernelLike, MeshConnection } from './connection';
import { statusText } from './model';
import { IServerInfo, MODE_CHOICES, cleanCode, modeOfChoice, openPayload, sharePayload } from './share';
import { DEFAULT_SETTINGS, IMeshSettings, joinPayload, peerName, readSettings } from './settings';
import { MeshView } from './view';

export const PANEL_ID = 'gradient-nb-mesh-panel';
export const PLUGIN_ID = 'gradient-nb-labextension:plugin';
/** The palette's category: the product's name. */
export const CATEGORY = 'gradient-nb';

export namespace CommandIDs {
  export const join = 'gradient-nb:join';
  export const leave = 'gradient-nb:leave';
  export const showPanel = 'gradient-nb:show-mesh';
  export const settings = 'gradient-nb:settings';
  export const share = 'gradient-nb:share-notebook';
  export const openShared = 'gradient-nb:open-shared';
}

/** This front end's Jupyter server, for the kernel's bridge. */
function serverInfo(): IServerInfo {
  const settings = ServerConnection.makeSettings();
  return { baseUrl: settings.baseUrl, token: settings.token, serverRoot: pageConfigOption('serverRoot') };
}

/** An option of the page's config data (what PageConfig.getOption reads), '' if absent. */
function pageConfigOption(name: string): string {
  try {
    const el = document.getElementById('jupyter-config-data');
    const value = el?.textContent ? JSON.parse(el.textContent)[name] : undefined;
    return typeof value === 'string' ? value : '';
  } catch {
    return '';
  }
}

/** The dialog body showing a share code, with its own Copy button (the dialog stays open). */
class ShareCodeBody extends Widget {
  constructor(code: string, mode: string) {
    super();
    this.addClass('gnb-ShareCode');
    const text = document.createElement('p');
    text.textContent =
      (mode === 'ro' ? 'Read-only' : 'Read-write') +
      ' share code. On the other machine: gradient-nb: Open Shared Notebook… (with a notebook whose kernel ' +
      'joined the same mesh open), and paste it. The share lasts while this notebook’s kernel stays in the mesh.';
    const field = document.createElement('textarea');
    field.className = 'gnb-ShareCode-code';
    field.readOnly = true;
    field.rows = 4;
    field.value = code;
    field.addEventListener('focus', () => field.select());
    const copy = document.createElement('button');
    copy.className = 'jp-mod-styled gnb-ShareCode-copy';
    copy.textContent = 'Copy';
    copy.addEventListener('click', () => {
      Clipboard.copyToSystem(code);
      copy.textContent = 'Copied';
    });
    this.node.append(text, field, copy);
  }
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
  private readonly _join: HTMLButtonElement;
  private readonly _leave: HTMLButtonElement;
  private readonly _share: HTMLButtonElement;
  private readonly _open: HTMLButtonElement;

  constructor(
    private readonly _connection: MeshConnection,
    commands: JupyterFrontEnd['commands']
  ) {
    super();
    this.id = PANEL_ID;
    this.addClass('gnb-MeshPanel');
    this.title.icon = meshIcon;
    this.title.caption = 'Mesh';
    // The panel's own Join/Leave/Share/Open: the same commands as the palette's.
    const bar = document.createElement('div');
    bar.className = 'gnb-MeshPanel-actions';
    const button = (label: string, command: string) => {
      const b = document.createElement('button');
      b.className = 'jp-mod-styled';
      b.textContent = label;
      b.dataset.command = command;
      b.addEventListener('click', () => void commands.execute(command));
      bar.appendChild(b);
      return b;
    };
    this._join = button('Join…', CommandIDs.join);
    this._leave = button('Leave', CommandIDs.leave);
    this._share = button('Share…', CommandIDs.share);
    this._open = button('Open Shared…', CommandIDs.openShared);
    this.node.appendChild(bar);
    this.view = new MeshView(this.node); // appends after the bar; the panel node carries its data-*
    _connection.changed.connect(this._update, this);
    this._update();
  }

  private _update(): void {
    this.view.render(this._connection.state, this._connection.snapshot);
    const joined = this._connection.snapshot?.joined === true;
    this._join.disabled = joined || this._connection.kernel === null;
    this._leave.disabled = !joined;
    this._share.disabled = !joined;
    this._open.disabled = !joined;
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
  id: PLUGIN_ID,
  description: 'Shows the peers and links of the notebook kernel’s gradient-nb mesh; joins kernels to it.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, IStatusBar, ILabShell, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null,
    registry: ISettingRegistry | null
  ) => {
    const connection = new MeshConnection();
    const panel = new MeshPanel(connection, app.commands);
    app.shell.add(panel, 'left', { rank: 900 });

    let settings: IMeshSettings = { ...DEFAULT_SETTINGS };
    const notebookName = () => peerName(settings, tracker.currentWidget?.context.path ?? null);
    const autoJoiner = new AutoJoiner(
      connection,
      () => settings,
      notebookName,
      error => void showErrorMessage('gradient-nb: auto-join failed', error)
    );
    if (registry) {
      void registry.load(PLUGIN_ID).then(loaded => {
        const update = () => {
          settings = readSettings(loaded.composite as Record<string, unknown>);
          autoJoiner.check();
        };
        loaded.changed.connect(update);
        update();
      });
    }
    followCurrentKernel(tracker, connection);

    app.commands.addCommand(CommandIDs.join, {
      label: 'gradient-nb: Join a Mesh…',
      caption: 'Join the current notebook’s kernel to a gradient-nb mesh (empty URL: a new local mesh)',
      execute: async () => {
        const url = await InputDialog.getText({
          title: 'Join a mesh',
          label: 'Rendezvous URL (empty: start a new local mesh in this kernel)',
          placeholder: 'ws://host:port',
          text: settings.rendezvousUrl
        });
        if (!url.button.accept) {
          return;
        }
        const name = await InputDialog.getText({
          title: url.value?.trim() ? 'Join a mesh' : 'Start a local mesh',
          label: 'Name of this peer (optional)',
          placeholder: '',
          text: notebookName() ?? ''
        });
        if (!name.button.accept) {
          return;
        }
        const reply = await connection.request('join', joinPayload(settings, url.value ?? '', name.value ?? null));
        if (!reply.ok) {
          await showErrorMessage('Could not join the mesh', reply.error);
        }
      }
    });
    app.commands.addCommand(CommandIDs.leave, {
      label: 'gradient-nb: Leave the Mesh',
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
      label: 'gradient-nb: Show Mesh Panel',
      execute: () => {
        if (labShell) {
          labShell.activateById(PANEL_ID);
        } else {
          app.shell.activateById(PANEL_ID);
        }
      }
    });
    app.commands.addCommand(CommandIDs.settings, {
      label: 'gradient-nb: Mesh Settings (auto-join, rendezvous, TURN)…',
      isVisible: () => registry !== null && app.commands.hasCommand('settingeditor:open'),
      execute: () => app.commands.execute('settingeditor:open', { query: 'gradient-nb' })
    });
    app.commands.addCommand(CommandIDs.share, {
      label: 'gradient-nb: Share Notebook over the Mesh…',
      caption: 'Share the current notebook, live, with peers of its kernel’s mesh: gives a share code',
      isEnabled: () => tracker.currentWidget !== null,
      execute: async () => {
        const notebook = tracker.currentWidget;
        if (!notebook) {
          return;
        }
        const choice = await InputDialog.getItem({
          title: `Share ${notebook.context.path} over the mesh`,
          label: 'Those who open it may',
          items: MODE_CHOICES.map(c => c.label),
          current: 0
        });
        const mode = choice.button.accept ? modeOfChoice(choice.value) : null;
        if (!mode) {
          return;
        }
        const reply = await connection.request('share', sharePayload(notebook.context.path, mode, serverInfo()));
        if (!reply.ok || !reply.code) {
          await showErrorMessage('Could not share the notebook', reply.error || 'the kernel gave no share code');
          return;
        }
        await showDialog({
          title: 'Notebook shared over the mesh',
          body: new ShareCodeBody(reply.code, mode),
          buttons: [Dialog.okButton({ label: 'Close' })]
        });
      }
    });
    app.commands.addCommand(CommandIDs.openShared, {
      label: 'gradient-nb: Open Shared Notebook…',
      caption: 'Open a notebook shared over the mesh (a share code) through the current notebook’s kernel',
      execute: async () => {
        if (!tracker.currentWidget || connection.snapshot?.joined !== true) {
          await showErrorMessage(
            'Open Shared Notebook',
            'Open a notebook whose kernel has joined the mesh first (gradient-nb: Join a Mesh…): ' +
              'its kernel opens the shared notebook.'
          );
          return;
        }
        const answer = await InputDialog.getText({
          title: 'Open a shared notebook',
          label: 'Share code',
          placeholder: 'gnbshare1.…'
        });
        const code = answer.button.accept ? cleanCode(answer.value) : '';
        if (!code) {
          return;
        }
        const reply = await connection.request('open', openPayload(code, serverInfo()));
        if (!reply.ok || !reply.path) {
          await showErrorMessage('Could not open the shared notebook', reply.error || 'the kernel gave no path');
          return;
        }
        await app.commands.execute('docmanager:open', { path: reply.path });
      }
    });
    connection.changed.connect(() => {
      app.commands.notifyCommandChanged(CommandIDs.leave);
      app.commands.notifyCommandChanged(CommandIDs.share);
    });
    tracker.currentChanged.connect(() => app.commands.notifyCommandChanged(CommandIDs.share));

    if (palette) {
      for (const command of [
        CommandIDs.join,
        CommandIDs.leave,
        CommandIDs.share,
        CommandIDs.openShared,
        CommandIDs.showPanel,
        CommandIDs.settings
      ]) {
        palette.addItem({ command, category: CATEGORY });
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
