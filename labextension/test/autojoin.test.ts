import { describe, expect, it } from 'vitest';

import { AutoJoiner } from '../src/autojoin';
import { IKernelLike, MeshConnection } from '../src/connection';
import { DEFAULT_SETTINGS, IMeshSettings } from '../src/settings';
import { FakeKernel } from './fakes';
import { threePeers } from './fixtures';

const asKernel = (k: FakeKernel) => k as unknown as IKernelLike;
const joins = (k: FakeKernel) => k.comms.flatMap(c => c.sent).filter(m => m.request === 'join');

function setup(settings: Partial<IMeshSettings>) {
  const conn = new MeshConnection();
  const current: IMeshSettings = { ...DEFAULT_SETTINGS, ...settings };
  const errors: string[] = [];
  const joiner = new AutoJoiner(conn, () => current, () => 'nb', e => errors.push(e));
  const kernel = new FakeKernel();
  conn.setKernel(asKernel(kernel));
  return { conn, current, joiner, kernel, errors };
}

describe('AutoJoiner', () => {
  it('joins a kernel that has not joined, once, with the settings', () => {
    const { kernel } = setup({ autoJoin: true, rendezvousUrl: 'ws://h:1', mesh: 'lab' });
    expect(joins(kernel)).toHaveLength(0); // not before the kernel has said where it stands
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: { joined: false } });
    expect(joins(kernel)).toEqual([
      expect.objectContaining({ request: 'join', url: 'ws://h:1', name: 'nb', mesh: 'lab' })
    ]);
    // More snapshots of the same kernel (still joining, or left later): no second join.
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: { joined: false, marker: 1 } });
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: threePeers() });
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: { joined: false } });
    expect(joins(kernel)).toHaveLength(1);
  });

  it('joins again after a restart, a fresh process', () => {
    const { kernel } = setup({ autoJoin: true, rendezvousUrl: 'ws://h:1' });
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: { joined: false } });
    kernel.setStatus('restarting');
    kernel.setStatus('idle');
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: { joined: false } });
    expect(joins(kernel)).toHaveLength(2);
  });

  it('does nothing when off, without a URL, or for a kernel that has joined', () => {
    for (const settings of [{ autoJoin: false, rendezvousUrl: 'ws://h:1' }, { autoJoin: true }]) {
      const { kernel } = setup(settings);
      kernel.lastComm.deliver({ type: 'snapshot', snapshot: { joined: false } });
      expect(joins(kernel)).toHaveLength(0);
    }
    const { kernel } = setup({ autoJoin: true, rendezvousUrl: 'ws://h:1' });
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: threePeers() });
    expect(joins(kernel)).toHaveLength(0);
  });

  it('turning the setting on joins the current kernel; a refusal is reported, not retried', async () => {
    const { conn, current, joiner, kernel, errors } = setup({ rendezvousUrl: 'ws://h:1' });
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: { joined: false } });
    current.autoJoin = true;
    joiner.check();
    const [sent] = joins(kernel);
    expect(sent).toBeDefined();
    kernel.lastComm.deliver({ type: 'reply', request: 'join', id: sent.id, ok: false, error: 'refused' });
    await new Promise(r => setTimeout(r, 0));
    expect(errors).toEqual(['refused']);
    kernel.lastComm.deliver({ type: 'snapshot', snapshot: { joined: false, marker: 2 } });
    expect(joins(kernel)).toHaveLength(1);
    expect(conn.state).toBe('connected');
  });
});
