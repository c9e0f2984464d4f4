/**
 * Shared notebooks over the mesh: the `share` and `open` requests of the mesh comm (see
 * gradient_nb/notebook/comm.py) and the choices the commands offer. The kernel runs the bridge
 * (gradient_nb.notebook.share); it is told which Jupyter server to use (this front end's), so it
 * never has to guess one from `jupyter server list`.
 */

export type ShareMode = 'rw' | 'ro';

/** The choices of the Share command's dialog, in order, the default first. */
export const MODE_CHOICES: ReadonlyArray<{ label: string; mode: ShareMode }> = [
  { label: 'Read-write: they can edit it', mode: 'rw' },
  { label: 'Read-only: they can only read it', mode: 'ro' }
];

export function modeOfChoice(label: string | null | undefined): ShareMode | null {
  return MODE_CHOICES.find(c => c.label === label)?.mode ?? null;
}

/** This front end's Jupyter server, as the kernel needs it. */
export interface IServerInfo {
  /** Full base URL, e.g. http://127.0.0.1:8888/ (ServerConnection settings' baseUrl). */
  baseUrl: string;
  token: string;
  /** The server's root directory (PageConfig's serverRoot), where its YStore lies; '' if unknown. */
  serverRoot: string;
}

function serverFields(server: IServerInfo): Record<string, unknown> {
  const fields: Record<string, unknown> = { server_url: server.baseUrl, token: server.token };
  if (server.serverRoot) {
    fields.server_root = server.serverRoot;
  }
  return fields;
}

/** The `share` request's payload for the notebook at `path` (relative to the server's root). */
export function sharePayload(
  path: string,
  mode: ShareMode,
  server: IServerInfo,
  expiresIn?: number
): Record<string, unknown> {
  const payload: Record<string, unknown> = { path, mode, ...serverFields(server) };
  if (expiresIn !== undefined) {
    payload.expires_in = expiresIn;
  }
  return payload;
}

/** A share code as pasted: surrounding white space and line breaks (from a wrapped copy) removed. */
export function cleanCode(text: string | null | undefined): string {
  return (text ?? '').replace(/\s+/g, '');
}

/** The `open` request's payload for share code `code`. */
export function openPayload(code: string, server: IServerInfo): Record<string, unknown> {
  return { code: cleanCode(code), ...serverFields(server) };
}
