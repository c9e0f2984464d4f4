/**
 * The DOM of the Mesh panel, updated in place from snapshots.
 *
 * Plain DOM (no Lumino) so it is tested in jsdom. Rows are keyed by peer id / link pair and
 * updated, not rebuilt, so a row keeps its element (and the user's selection or hover) while
 * the mesh changes around it.
 */

import {
  diffRows,
  ILinkRow,
  IPeerRow,
  linkRows,
  MeshSnapshot,
  NO_KERNEL_MESSAGE,
  NOT_JOINED_MESSAGE,
  peerCount,
  peerRows
} from './model';

export type ViewState = 'no-kernel' | 'connecting' | 'connected' | 'unavailable';

const PEER_COLUMNS: [keyof IPeerRow['cells'], string][] = [
  ['name', 'Name'],
  ['id', 'Id'],
  ['devices', 'Devices'],
  ['services', 'Services'],
  ['layers', 'Layers']
];

const LINK_COLUMNS: [keyof ILinkRow['cells'], string][] = [
  ['peers', 'Link'],
  ['kind', 'Kind'],
  ['type', 'Type'],
  ['rtt', 'RTT']
];

interface IKeyedRow {
  key: string;
  cells: Record<string, string>;
  title: string;
}

class KeyedTable<R extends IKeyedRow> {
  readonly table: HTMLTableElement;
  private readonly _body: HTMLTableSectionElement;
  private readonly _rows = new Map<string, HTMLTableRowElement>();
  private _last: R[] = [];

  constructor(
    doc: Document,
    className: string,
    private readonly _columns: [string, string][],
    private readonly _decorate: (tr: HTMLTableRowElement, row: R) => void
  ) {
    this.table = doc.createElement('table');
    this.table.className = className;
    const head = this.table.createTHead().insertRow();
    for (const [key, label] of _columns) {
      const th = doc.createElement('th');
      th.textContent = label;
      th.dataset.column = key;
      head.appendChild(th);
    }
    this._body = this.table.createTBody();
  }

  rowElement(key: string): HTMLTableRowElement | undefined {
    return this._rows.get(key);
  }

  update(next: R[]): void {
    const diff = diffRows(this._last, next);
    for (const key of diff.removed) {
      this._rows.get(key)?.remove();
      this._rows.delete(key);
    }
    for (const row of [...diff.added, ...diff.changed]) {
      let tr = this._rows.get(row.key);
      if (!tr) {
        tr = this._body.ownerDocument.createElement('tr');
        for (const [key, label] of this._columns) {
          const td = tr.insertCell();
          td.dataset.column = key;
          // A narrow panel shows rows as cards, each cell after its column's name (base.css).
          td.dataset.label = label;
        }
        this._rows.set(row.key, tr);
      }
      this._columns.forEach(([key], i) => {
        const td = tr!.cells[i];
        if (td.textContent !== row.cells[key]) {
          td.textContent = row.cells[key];
        }
      });
      tr.title = row.title;
      this._decorate(tr, row);
    }
    // Put rows in order, moving only those out of place.
    diff.order.forEach((key, i) => {
      const tr = this._rows.get(key)!;
      if (this._body.rows[i] !== tr) {
        this._body.insertBefore(tr, this._body.rows[i] ?? null);
      }
    });
    this._last = next;
  }
}

export class MeshView {
  readonly node: HTMLElement;
  private readonly _message: HTMLElement;
  private readonly _summary: HTMLElement;
  private readonly _content: HTMLElement;
  private readonly _peers: KeyedTable<IPeerRow>;
  private readonly _links: KeyedTable<ILinkRow>;
  private readonly _noLinks: HTMLElement;

  constructor(node: HTMLElement) {
    const doc = node.ownerDocument;
    this.node = node;
    node.classList.add('gnb-MeshView');
    node.dataset.peerCount = '0';

    this._message = doc.createElement('div');
    this._message.className = 'gnb-MeshView-message';

    this._content = doc.createElement('div');
    this._content.className = 'gnb-MeshView-content';
    this._summary = doc.createElement('div');
    this._summary.className = 'gnb-MeshView-summary';

    this._peers = new KeyedTable<IPeerRow>(doc, 'gnb-MeshView-peers', PEER_COLUMNS, (tr, row) => {
      tr.dataset.peerId = row.key;
      tr.classList.toggle('gnb-mod-self', row.isSelf);
    });
    this._links = new KeyedTable<ILinkRow>(doc, 'gnb-MeshView-links', LINK_COLUMNS, (tr, row) => {
      tr.dataset.linkKey = row.key;
      tr.dataset.kind = row.kind;
      tr.classList.toggle('gnb-mod-relayed', row.relayed);
      tr.classList.toggle('gnb-mod-direct', !row.relayed);
    });
    this._noLinks = doc.createElement('div');
    this._noLinks.className = 'gnb-MeshView-empty';
    this._noLinks.textContent = 'No links yet.';

    const peersTitle = doc.createElement('h3');
    peersTitle.textContent = 'Peers';
    const linksTitle = doc.createElement('h3');
    linksTitle.textContent = 'Links';
    this._content.append(this._summary, peersTitle, this._peers.table, linksTitle, this._links.table, this._noLinks);
    node.append(this._message, this._content);
    this.render('no-kernel', null);
  }

  peerRow(id: string): HTMLTableRowElement | undefined {
    return this._peers.rowElement(id);
  }

  render(state: ViewState, snapshot: MeshSnapshot | null): void {
    this.node.dataset.state = state;
    const joined = snapshot !== null && snapshot.joined;
    this.node.dataset.joined = String(joined);
    this.node.dataset.peerCount = String(snapshot ? peerCount(snapshot) : 0);

    if (!joined) {
      let text = state === 'no-kernel' ? NO_KERNEL_MESSAGE : NOT_JOINED_MESSAGE;
      if (snapshot && !snapshot.joined && snapshot.error) {
        text += ` (the kernel reported: ${snapshot.error})`;
      }
      this._message.textContent = text;
      this._message.hidden = false;
      this._content.hidden = true;
      this._peers.update([]);
      this._links.update([]);
      return;
    }
    this._message.hidden = true;
    this._content.hidden = false;
    const n = snapshot.peers.length;
    this._summary.textContent =
      `Mesh “${snapshot.mesh}” via ${snapshot.rendezvous || '—'}: ${n} ${n === 1 ? 'peer' : 'peers'}`;
    this._peers.update(peerRows(snapshot));
    const links = linkRows(snapshot);
    this._links.update(links);
    this._links.table.hidden = links.length === 0;
    this._noLinks.hidden = links.length !== 0;
  }
}
