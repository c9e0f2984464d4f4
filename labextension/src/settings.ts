/**
 * The extension's settings (JupyterLab's settings editor, schema/plugin.json) and the join requests
 * made from them. Pure: tested in plain node.
 */

export interface IMeshSettings {
  autoJoin: boolean;
  rendezvousUrl: string;
  mesh: string;
  peerName: string;
  secret: string;
  stunServer: string;
  turnServer: string;
  turnUsername: string;
  turnPassword: string;
}

export const DEFAULT_SETTINGS: IMeshSettings = {
  autoJoin: false,
  rendezvousUrl: '',
  mesh: 'default',
  peerName: '',
  secret: '',
  stunServer: '',
  turnServer: '',
  turnUsername: '',
  turnPassword: ''
};

/** The settings from the registry's composite value; anything missing or mistyped takes its default. */
export function readSettings(composite: Record<string, unknown> | null | undefined): IMeshSettings {
  const out: IMeshSettings = { ...DEFAULT_SETTINGS };
  if (!composite) {
    return out;
  }
  for (const key of Object.keys(DEFAULT_SETTINGS) as (keyof IMeshSettings)[]) {
    const value = composite[key];
    if (typeof value === typeof DEFAULT_SETTINGS[key]) {
      (out as unknown as Record<string, unknown>)[key] = typeof value === 'string' ? value.trim() : value;
    }
  }
  return out;
}

/** A peer's name: the setting, else the notebook's file name without its extension. */
export function peerName(settings: IMeshSettings, notebookPath: string | null): string | null {
  if (settings.peerName) {
    return settings.peerName;
  }
  const base = (notebookPath ?? '').split('/').pop() ?? '';
  return base.replace(/\.ipynb$/, '') || null;
}

/**
 * The kernel's ``join`` request (gradient_nb/notebook/comm.py): ``url`` empty or null joins a new local
 * mesh introduced by the kernel; the mesh, secret and STUN/TURN settings travel with it.
 */
export function joinPayload(
  settings: IMeshSettings,
  url: string | null,
  name: string | null
): Record<string, unknown> {
  const target = url?.trim() ? { url: url.trim() } : { local: true };
  const options: Record<string, string> = {};
  const pairs: [string, string][] = [
    ['mesh', settings.mesh],
    ['secret', settings.secret],
    ['stun', settings.stunServer],
    ['turn', settings.turnServer],
    ['turn_username', settings.turnUsername],
    ['turn_password', settings.turnPassword]
  ];
  for (const [key, value] of pairs) {
    if (value) {
      options[key] = value;
    }
  }
  return { ...target, name: name?.trim() || null, ...options };
}
