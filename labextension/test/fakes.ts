/** A fake comm and kernel that speak the same messages as ipykernel's side of the comm. */

import { Signal } from '@lumino/signaling';

import { ICommLike, ICommMessage } from '../src/protocol';

export class FakeComm implements ICommLike {
  sent: any[] = [];
  opened = 0;
  closed = 0;
  isDisposed = false;
  onMsg: (msg: ICommMessage) => void = () => undefined;
  onClose: (msg: ICommMessage) => void = () => undefined;

  open(): void {
    this.opened += 1;
  }
  send(data: any): void {
    this.sent.push(data);
  }
  close(): void {
    this.closed += 1;
    this.isDisposed = true;
  }
  /** The kernel sends a comm_msg. */
  deliver(data: unknown): void {
    this.onMsg({ content: { data } });
  }
  /** The kernel closes the comm (no such target, or it unregistered). */
  kernelCloses(): void {
    this.isDisposed = true;
    this.onClose({ content: { data: {} } });
  }
}

export class FakeKernel {
  isDisposed = false;
  status = 'idle';
  comms: FakeComm[] = [];
  statusChanged = new Signal<this, string>(this);
  iopubMessage = new Signal<this, { header: { msg_type: string } }>(this);

  createComm(target: string): FakeComm {
    if (target !== 'gradient_nb.mesh') {
      throw new Error(`unexpected target ${target}`);
    }
    const comm = new FakeComm();
    this.comms.push(comm);
    return comm;
  }

  setStatus(status: string): void {
    this.status = status;
    this.statusChanged.emit(status);
  }

  runCell(): void {
    this.setStatus('busy');
    this.iopubMessage.emit({ header: { msg_type: 'execute_input' } });
    this.setStatus('idle');
  }

  get lastComm(): FakeComm {
    return this.comms[this.comms.length - 1];
  }
}
