import { afterEach, describe, expect, it, vi } from 'vitest';

import { MeshSnapshot } from '../src/model';
import { MeshChannel, parseKernelMessage } from '../src/protocol';
import { FakeComm } from './fakes';
import { threePeers } from './fixtures';

function channel(timeoutMs = 1000) {
  const comm = new FakeComm();
  const snapshots: MeshSnapshot[] = [];
  const closes: boolean[] = [];
  const ch = new MeshChannel(comm, { onSnapshot: s => snapshots.push(s), onClose: g => closes.push(g) }, timeoutMs);
  return { comm, ch, snapshots, closes };
}

afterEach(() => {
  vi.useRealTimers();
});

describe('parseKernelMessage', () => {
  it('knows snapshots and replies', () => {
    expect(parseKernelMessage({ type: 'snapshot', snapshot: { joined: false } })).toEqual({
      type: 'snapshot',
      snapshot: { joined: false }
    });
    expect(parseKernelMessage({ type: 'reply', request: 'join', id: 3, ok: false, error: 'x' })).toEqual({
      type: 'reply',
      request: 'join',
      id: 3,
      ok: false,
      error: 'x'
    });
    expect(parseKernelMessage({ type: 'what' })).toEqual({ type: 'unknown' });
    expect(parseKernelMessage(undefined)).toEqual({ type: 'unknown' });
  });
});

describe('MeshChannel', () => {
  it('opens the comm and delivers snapshots', () => {
    const { comm, ch, snapshots } = channel();
    ch.open();
    expect(comm.opened).toBe(1);
    expect(ch.gotSnapshot).toBe(false);
    comm.deliver({ type: 'snapshot', snapshot: threePeers() });
    expect(ch.gotSnapshot).toBe(true);
    expect(snapshots).toHaveLength(1);
    expect(snapshots[0].joined && snapshots[0].peers.length).toBe(3);
  });

  it('pairs requests with replies by id, whatever order replies come in', async () => {
    const { comm, ch } = channel();
    const join = ch.request('join', { url: 'ws://h:1', name: 'n' });
    const leave = ch.request('leave');
    expect(comm.sent).toEqual([
      { url: 'ws://h:1', name: 'n', request: 'join', id: 1 },
      { request: 'leave', id: 2 }
    ]);
    comm.deliver({ type: 'reply', request: 'leave', id: 2, ok: true, error: '' });
    comm.deliver({ type: 'reply', request: 'join', id: 1, ok: false, error: 'refused' });
    expect(await join).toEqual({ ok: false, error: 'refused' });
    expect(await leave).toEqual({ ok: true, error: '' });
  });

  it('fails a request that gets no reply in time', async () => {
    vi.useFakeTimers();
    const { ch } = channel(500);
    const pending = ch.request('leave');
    vi.advanceTimersByTime(501);
    expect(await pending).toEqual({ ok: false, error: 'no reply from the kernel to leave' });
  });

  it('fails waiting requests when the kernel closes the comm, and reports the close once', async () => {
    const { comm, ch, closes } = channel();
    const pending = ch.request('join', { url: 'ws://x' });
    comm.kernelCloses();
    expect(await pending).toMatchObject({ ok: false });
    expect(closes).toEqual([false]);
    expect(await ch.request('leave')).toMatchObject({ ok: false });
    ch.dispose();
    expect(closes).toEqual([false]);
  });

  it('closes the comm on dispose and ignores later messages', () => {
    const { comm, ch, snapshots, closes } = channel();
    comm.deliver({ type: 'snapshot', snapshot: { joined: false } });
    ch.dispose();
    expect(comm.closed).toBe(1);
    expect(closes).toEqual([true]);
    comm.deliver({ type: 'snapshot', snapshot: threePeers() });
    expect(snapshots).toHaveLength(1);
  });
});
