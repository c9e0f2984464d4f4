import { describe, expect, it } from 'vitest';

import { MeshChannel, parseKernelMessage } from '../src/protocol';
import { MODE_CHOICES, cleanCode, modeOfChoice, openPayload, sharePayload } from '../src/share';
import { FakeComm } from './fakes';

const server = { baseUrl: 'http://127.0.0.1:8888/', token: 'tok', serverRoot: '/home/u/work' };

describe('share payloads', () => {
  it('builds the share request: path, mode and this front end’s server', () => {
    expect(sharePayload('dir/a.ipynb', 'ro', server)).toEqual({
      path: 'dir/a.ipynb',
      mode: 'ro',
      server_url: 'http://127.0.0.1:8888/',
      token: 'tok',
      server_root: '/home/u/work'
    });
    expect(sharePayload('a.ipynb', 'rw', { ...server, serverRoot: '' }, 3600)).toEqual({
      path: 'a.ipynb',
      mode: 'rw',
      server_url: 'http://127.0.0.1:8888/',
      token: 'tok',
      expires_in: 3600
    });
  });

  it('builds the open request, with the pasted code cleaned of white space', () => {
    expect(openPayload('  gnbshare1.abc\n def \n', { ...server, token: '' })).toEqual({
      code: 'gnbshare1.abcdef',
      server_url: 'http://127.0.0.1:8888/',
      token: '',
      server_root: '/home/u/work'
    });
    expect(cleanCode(null)).toBe('');
  });

  it('maps the dialog’s choices to modes, read-write first', () => {
    expect(MODE_CHOICES.map(c => c.mode)).toEqual(['rw', 'ro']);
    expect(modeOfChoice(MODE_CHOICES[1].label)).toBe('ro');
    expect(modeOfChoice('something else')).toBeNull();
    expect(modeOfChoice(null)).toBeNull();
  });
});

describe('share and open over the channel', () => {
  it('parses the code and the path of replies, and only strings', () => {
    expect(parseKernelMessage({ type: 'reply', request: 'share', id: 1, ok: true, error: '', code: 'gnbshare1.x' }))
      .toEqual({ type: 'reply', request: 'share', id: 1, ok: true, error: '', code: 'gnbshare1.x' });
    expect(parseKernelMessage({ type: 'reply', request: 'open', id: 2, ok: true, error: '', path: 'shared/a.ipynb' }))
      .toEqual({ type: 'reply', request: 'open', id: 2, ok: true, error: '', path: 'shared/a.ipynb' });
    expect(parseKernelMessage({ type: 'reply', request: 'open', id: 2, ok: true, error: '', path: 3 })).toEqual({
      type: 'reply',
      request: 'open',
      id: 2,
      ok: true,
      error: ''
    });
  });

  it('sends share and open requests and resolves them with the code and the path', async () => {
    const comm = new FakeComm();
    const ch = new MeshChannel(comm, { onSnapshot: () => undefined, onClose: () => undefined }, 1000);
    const share = ch.request('share', sharePayload('a.ipynb', 'rw', server));
    const open = ch.request('open', openPayload('gnbshare1.y', server));
    expect(comm.sent).toEqual([
      { ...sharePayload('a.ipynb', 'rw', server), request: 'share', id: 1 },
      { ...openPayload('gnbshare1.y', server), request: 'open', id: 2 }
    ]);
    comm.deliver({ type: 'reply', request: 'open', id: 2, ok: true, error: '', path: 'shared/a.ipynb' });
    comm.deliver({ type: 'reply', request: 'share', id: 1, ok: true, error: '', code: 'gnbshare1.y' });
    expect(await share).toEqual({ ok: true, error: '', code: 'gnbshare1.y' });
    expect(await open).toEqual({ ok: true, error: '', path: 'shared/a.ipynb' });
  });

  it('passes the kernel’s error on, as a message', async () => {
    const comm = new FakeComm();
    const ch = new MeshChannel(comm, { onSnapshot: () => undefined, onClose: () => undefined }, 1000);
    const open = ch.request('open', openPayload('bad', server));
    comm.deliver({ type: 'reply', request: 'open', id: 1, ok: false, error: "a share code starts with 'gnbshare1.'" });
    expect(await open).toEqual({ ok: false, error: "a share code starts with 'gnbshare1.'" });
  });
});
