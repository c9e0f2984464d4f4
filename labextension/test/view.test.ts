// @vitest-environment jsdom
import { describe, expect, it } from 'vitest';

import { NO_KERNEL_MESSAGE, NOT_JOINED_MESSAGE, parseSnapshot } from '../src/model';
import { MeshView } from '../src/view';
import { A, B, C, link, threePeers } from './fixtures';

function view() {
  const root = document.createElement('div');
  document.body.appendChild(root);
  return { root, v: new MeshView(root) };
}

const peerIds = (root: HTMLElement) =>
  [...root.querySelectorAll<HTMLElement>('tr[data-peer-id]')].map(tr => tr.dataset.peerId);

describe('MeshView', () => {
  it('says so when there is no kernel or no mesh', () => {
    const { root, v } = view();
    expect(root.textContent).toContain(NO_KERNEL_MESSAGE);
    expect(root.dataset.peerCount).toBe('0');
    v.render('unavailable', null);
    expect(root.textContent).toContain(NOT_JOINED_MESSAGE);
    v.render('connected', { joined: false, error: 'RuntimeError: x' });
    expect(root.querySelector('.gnb-MeshView-message')!.textContent).toBe(
      `${NOT_JOINED_MESSAGE} (the kernel reported: RuntimeError: x)`
    );
  });

  it('lists 3 peers then 2, keeping the row elements of the peers that stay', () => {
    const { root, v } = view();
    v.render('connected', parseSnapshot(threePeers()));
    expect(root.dataset.peerCount).toBe('3');
    expect(peerIds(root)).toEqual([A, B, C]);
    expect((root.querySelector('.gnb-MeshView-message') as HTMLElement).hidden).toBe(true);
    const carol = v.peerRow(C)!;
    const cells = [...carol.cells].map(td => td.textContent);
    expect(cells).toEqual(['carol', 'cccccccc', 'cpu x86_64 (16.0 GiB)', '—', '—']);

    const s = threePeers();
    s.peers = s.peers.filter(p => p.id !== B);
    s.links = s.links.filter(l => l.b !== B);
    v.render('connected', parseSnapshot(s));
    expect(root.dataset.peerCount).toBe('2');
    expect(peerIds(root)).toEqual([A, C]);
    expect(v.peerRow(C)).toBe(carol);
    expect(root.querySelectorAll('tr[data-link-key]')).toHaveLength(1);
  });

  it('shows each link’s kind (direct-tcp, webrtc-direct, webrtc-relay) with RTT', () => {
    const { root, v } = view();
    const s = threePeers();
    s.links.push(link(B, C, { kind: 'direct-tcp', rtt_ms: 0.08 }));
    v.render('connected', parseSnapshot(s));
    const rows = [...root.querySelectorAll<HTMLTableRowElement>('tr[data-link-key]')];
    expect(rows.map(r => [...r.cells].map(c => c.textContent))).toEqual([
      ['alice ↔ bob', 'webrtc-direct', 'host', '0.42 ms'],
      ['alice ↔ carol', 'webrtc-relay', 'relay', '31.5 ms'],
      ['bob ↔ carol', 'direct-tcp', 'host', '0.08 ms']
    ]);
    expect(rows.map(r => r.dataset.kind)).toEqual(['webrtc-direct', 'webrtc-relay', 'direct-tcp']);
    expect(rows.map(r => r.classList.contains('gnb-mod-relayed'))).toEqual([false, true, false]);
    expect(rows[0].classList.contains('gnb-mod-direct')).toBe(true);
    expect(root.querySelector('.gnb-MeshView-links th[data-column="kind"]')?.textContent).toBe('Kind');
    // A link that turns relayed (the NAT mapping changed, ICE restarted over TURN) updates in place.
    s.links[0] = link(A, B, { kind: 'webrtc-relay', type: 'relay', relayed: true });
    v.render('connected', parseSnapshot(s));
    const again = [...root.querySelectorAll<HTMLTableRowElement>('tr[data-link-key]')];
    expect(again[0]).toBe(rows[0]);
    expect([again[0].cells[1].textContent, again[0].dataset.kind]).toEqual(['webrtc-relay', 'webrtc-relay']);
    expect(again[0].classList.contains('gnb-mod-relayed')).toBe(true);
  });

  it('reorders rows when names change and clears them on leave', () => {
    const { root, v } = view();
    v.render('connected', parseSnapshot(threePeers()));
    const s = threePeers();
    s.peers = s.peers.map(p => (p.id === B ? { ...p, name: 'zed' } : p));
    v.render('connected', parseSnapshot(s));
    expect(peerIds(root)).toEqual([A, C, B]);
    v.render('connected', { joined: false });
    expect(peerIds(root)).toEqual([]);
    expect(root.dataset.peerCount).toBe('0');
    expect(root.dataset.joined).toBe('false');
  });

  it('labels every cell with its column, for the narrow panel’s card layout', () => {
    const { root, v } = view();
    v.render('connected', parseSnapshot(threePeers()));
    const heads = (sel: string) =>
      [...root.querySelectorAll<HTMLElement>(`${sel} th`)].map(th => th.textContent);
    for (const sel of ['.gnb-MeshView-peers', '.gnb-MeshView-links']) {
      const rows = [...root.querySelectorAll<HTMLTableRowElement>(`${sel} tbody tr`)];
      expect(rows.length).toBeGreaterThan(0);
      for (const tr of rows) {
        expect([...tr.cells].map(td => td.dataset.label)).toEqual(heads(sel));
      }
    }
    expect(heads('.gnb-MeshView-peers')).toContain('Layers');
    expect(heads('.gnb-MeshView-links')).toContain('RTT');
  });
});
