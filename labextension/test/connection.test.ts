import { describe, expect, it } from 'vitest';

import { IKernelLike, MeshConnection } from '../src/connection';
import { FakeKernel } from './fakes';
import { threePeers } from './fixtures';

const asKernel = (k: FakeKernel) => k as unknown as IKernelLike;

function connected() {
  const conn = new MeshConnection();
  let changes = 0;
  conn.changed.connect(() => (changes += 1));
  const kernel = new FakeKernel();
  conn.setKernel(asKernel(kernel));
  return { conn, kernel, changes: () => changes };
}

describe('MeshConnection', () => {
  it('starts with no kernel', () => {
    const conn = new MeshConnection();
    expect(conn.state).toBe('no-kernel');
    expect(conn.snapshot).toBeNull();
  });

  it('opens a comm to a new kernel and follows its snapshots', () => {
    const { conn, kernel, changes } = connected();
    expect(kernel.comms).toHaveLength(1);
    expect(kernel.lastComm.opened).toBe(1);
    expect(conn.state).toBe('connecting');
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: threePeers() });
    expect(conn.state).toBe('connected');
    expect(conn.snapshot?.joined).toBe(true);
    expect(changes()).toBeGreaterThan(0);
  });

  it('waits for a cell to run before retrying a kernel without the comm target', () => {
    const { conn, kernel } = connected();
    kernel.lastComm.kernelCloses(); // no gradient_nb.mesh target registered yet
    expect(conn.state).toBe('unavailable');
    // the comm_open itself made the kernel busy then idle: that must not cause a retry loop
    kernel.setStatus('busy');
    kernel.setStatus('idle');
    expect(kernel.comms).toHaveLength(1);
    kernel.runCell(); // e.g. %mesh join, which registers the target
    expect(kernel.comms).toHaveLength(2);
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: threePeers() });
    expect(conn.state).toBe('connected');
  });

  it('re-opens at once when a working comm is closed by the kernel', () => {
    const { conn, kernel } = connected();
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: threePeers() });
    kernel.lastComm.kernelCloses();
    expect(conn.snapshot).toBeNull();
    kernel.setStatus('idle');
    expect(kernel.comms).toHaveLength(2);
  });

  it('drops the comm on restart and re-opens when the kernel is back', () => {
    const { conn, kernel } = connected();
    const first = kernel.lastComm;
    first.deliver({ type: 'snapshot', snapshot: threePeers() });
    kernel.setStatus('restarting');
    expect(conn.state).toBe('unavailable');
    expect(conn.snapshot).toBeNull();
    expect(first.closed).toBe(1);
    kernel.setStatus('starting');
    expect(kernel.comms).toHaveLength(1);
    kernel.setStatus('idle');
    expect(kernel.comms).toHaveLength(2);
    // a late message on the dead comm changes nothing
    first.deliver({ type: 'snapshot', snapshot: threePeers() });
    expect(conn.snapshot).toBeNull();
  });

  it('switches kernels, closing the old comm and ignoring the old kernel', () => {
    const { conn, kernel } = connected();
    const other = new FakeKernel();
    conn.setKernel(asKernel(other));
    expect(kernel.lastComm.closed).toBe(1);
    expect(other.comms).toHaveLength(1);
    kernel.runCell();
    expect(kernel.comms).toHaveLength(1);
    conn.setKernel(null);
    expect(conn.state).toBe('no-kernel');
    expect(other.lastComm.closed).toBe(1);
  });

  it('does not open a comm on a dead kernel until it comes back', () => {
    const conn = new MeshConnection();
    const kernel = new FakeKernel();
    kernel.status = 'dead';
    conn.setKernel(asKernel(kernel));
    expect(kernel.comms).toHaveLength(0);
    kernel.setStatus('idle');
    expect(kernel.comms).toHaveLength(1);
  });

  it('sends requests only over a working comm', async () => {
    const { conn, kernel } = connected();
    expect(await conn.request('leave')).toMatchObject({ ok: false });
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: threePeers() });
    const reply = conn.request('join', { url: 'ws://h:1', name: null });
    const sent = kernel.lastComm.sent[0];
    expect(sent).toMatchObject({ request: 'join', url: 'ws://h:1', name: null });
    kernel.lastComm.deliver({ type: 'reply', request: 'join', id: sent.id, ok: true, error: '' });
    expect(await reply).toEqual({ ok: true, error: '' });
    expect(await new MeshConnection().request('leave')).toEqual({ ok: false, error: 'no notebook kernel' });
  });
});
