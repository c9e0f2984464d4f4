import { describe, expect, it } from 'vitest';

import { DEFAULT_SETTINGS, joinPayload, peerName, readSettings } from '../src/settings';

describe('settings', () => {
  it('reads the registry value, defaulting what is missing or mistyped', () => {
    expect(readSettings(null)).toEqual(DEFAULT_SETTINGS);
    const s = readSettings({ autoJoin: true, rendezvousUrl: ' ws://h:1 ', mesh: 7, turnServer: 'turn:x:3478' });
    expect(s.autoJoin).toBe(true);
    expect(s.rendezvousUrl).toBe('ws://h:1');
    expect(s.mesh).toBe('default');
    expect(s.turnServer).toBe('turn:x:3478');
  });

  it('names a peer by the setting, else by the notebook', () => {
    expect(peerName(DEFAULT_SETTINGS, 'work/analysis.ipynb')).toBe('analysis');
    expect(peerName({ ...DEFAULT_SETTINGS, peerName: 'alice' }, 'work/analysis.ipynb')).toBe('alice');
    expect(peerName(DEFAULT_SETTINGS, null)).toBeNull();
  });

  it('builds join requests: a URL, or a local mesh when it is empty; settings travel along', () => {
    const s = { ...DEFAULT_SETTINGS, mesh: 'lab', secret: 's3', turnServer: 'turn:t:3478', turnUsername: 'u',
                turnPassword: 'p' };
    expect(joinPayload(s, ' ws://h:1 ', 'a')).toEqual({
      url: 'ws://h:1', name: 'a', mesh: 'lab', secret: 's3', turn: 'turn:t:3478', turn_username: 'u',
      turn_password: 'p'
    });
    expect(joinPayload(DEFAULT_SETTINGS, '', '')).toEqual({ local: true, name: null, mesh: 'default' });
    expect(joinPayload(DEFAULT_SETTINGS, null, 'b')).toEqual({ local: true, name: 'b', mesh: 'default' });
  });
});
