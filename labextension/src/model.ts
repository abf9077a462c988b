/**
 * State behind the toolbar button and the snapshots panel, fed by the REST API
 * and kept live by the server's event stream (no polling).
 */
import { ISignal, Signal } from '@lumino/signaling';

import {
  CheckpointClient,
  IKernelState,
  INotebookDocument,
  ISchedule,
  IServerStatus,
  ISnapshot
} from './api';

export const SNAPSHOT_SCHEMA =
  'https://events.jupyter.org/jupyter_ckpt/snapshot/v1';

/** One event of schema snapshot/v1, as the server emits it. */
export interface ISnapshotEvent {
  schema_id?: string;
  action: string;
  snapshot_id?: string;
  kernel_id?: string;
  status?: string;
  memory_bytes?: number;
  changed_bytes?: number;
  stored_bytes?: number;
  freeze_seconds?: number;
  message?: string;
  /** notebook_restored: the notebook written. */
  path?: string;
}

export function isSnapshotEvent(event: {
  schema_id?: string;
}): event is ISnapshotEvent {
  return event.schema_id === SNAPSHOT_SCHEMA;
}

/** The calls the panel model makes (the client, or a test's stand-in). */
export type IModelClient = Pick<
  CheckpointClient,
  'list' | 'status' | 'kernel' | 'schedule' | 'notebook'
>;

/** How a snapshot's notebook differs from the open one, in cells. */
export interface INotebookChanges {
  /** Cells of the open notebook the snapshot's lacks. */
  added: number;
  /** Cells of the snapshot's notebook the open one lacks. */
  removed: number;
  /** Cells in both whose type or source differ. */
  changed: number;
}

function sourceOf(cell: INotebookDocument['cells'][number]): string {
  return Array.isArray(cell.source) ? cell.source.join('') : cell.source;
}

/**
 * Compare a snapshot's notebook with the open one. Cells are matched by
 * their id (nbformat 4.5), else by position.
 */
export function notebookChanges(
  then: INotebookDocument,
  now: INotebookDocument
): INotebookChanges {
  const key = (c: INotebookDocument['cells'][number], i: number) =>
    c.id ? `id:${c.id}` : `at:${i}`;
  const before = new Map(then.cells.map((c, i) => [key(c, i), c]));
  const after = new Map(now.cells.map((c, i) => [key(c, i), c]));
  let added = 0;
  let changed = 0;
  for (const [k, cell] of after) {
    const old = before.get(k);
    if (!old) {
      added++;
    } else if (
      old.cell_type !== cell.cell_type ||
      sourceOf(old) !== sourceOf(cell)
    ) {
      changed++;
    }
  }
  const removed = [...before.keys()].filter(k => !after.has(k)).length;
  return { added, removed, changed };
}

/** "2 cells added, 1 changed", or "same cells". */
export function describeChanges(c: INotebookChanges): string {
  const parts = [
    c.added ? `${c.added} added` : '',
    c.removed ? `${c.removed} removed` : '',
    c.changed ? `${c.changed} changed` : ''
  ].filter(Boolean);
  return parts.length ? `cells since: ${parts.join(', ')}` : 'same cells';
}

/**
 * The snapshots the panel shows: those of the current notebook (or all of
 * them), which one the running kernel came from, and its auto-backup schedule.
 */
export class SnapshotsModel {
  constructor(private readonly client: IModelClient) {}

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  path: string | null = null;
  kernelId: string | null = null;
  showAll = false;
  snapshots: ISnapshot[] = [];
  restoredFrom: string | null = null;
  kernel: IKernelState | null = null;
  schedule: ISchedule | null = null;
  server: IServerStatus | null = null;
  error = '';
  /** The open notebook's document as shown (unsaved edits included). */
  currentDocument: INotebookDocument | null = null;
  /** Grows with each change of currentDocument. */
  documentVersion = 0;

  setCurrentDocument(document: INotebookDocument | null): void {
    this.currentDocument = document;
    this.documentVersion++;
    this._changed.emit();
  }

  /** A snapshot's notebook (fetched once: snapshots do not change). */
  notebookOf(snapshot: ISnapshot): Promise<INotebookDocument | null> {
    if (!snapshot.notebook || snapshot.status !== 'complete') {
      return Promise.resolve(null);
    }
    let found = this._notebooks.get(snapshot.id);
    if (!found) {
      found = this.client.notebook(snapshot.id).catch(() => null);
      this._notebooks.set(snapshot.id, found);
    }
    return found;
  }

  /** The notebook (and its kernel) the panel is about. */
  async setContext(
    path: string | null,
    kernelId: string | null
  ): Promise<void> {
    if (path === this.path && kernelId === this.kernelId) {
      return;
    }
    this.path = path;
    this.kernelId = kernelId;
    await this.refresh();
  }

  async setShowAll(showAll: boolean): Promise<void> {
    this.showAll = showAll;
    await this.refresh();
  }

  async refresh(): Promise<void> {
    try {
      this.server = this.server ?? (await this.client.status());
      const filter = this.showAll || !this.path ? {} : { path: this.path };
      const listed = await this.client.list(filter);
      // Ids are ULIDs: their order is the order of creation.
      this.snapshots = [...listed].sort((a, b) =>
        a.id < b.id ? 1 : a.id > b.id ? -1 : 0
      );
      this.kernel = this.kernelId
        ? await this.client.kernel(this.kernelId).catch(() => null)
        : null;
      this.restoredFrom = this.kernel?.restored_from ?? null;
      this.schedule =
        this.kernelId && this.kernel?.checkpointable
          ? await this.client.schedule(this.kernelId).catch(() => null)
          : null;
      this.error = '';
    } catch (error) {
      this.error = (error as Error).message;
    }
    this._changed.emit();
  }

  /** Apply one event from the server's stream. */
  handleEvent(event: ISnapshotEvent): void {
    const known = this.snapshots.find(s => s.id === event.snapshot_id);
    if (known && event.status) {
      known.status = event.status as ISnapshot['status'];
      known.memory_bytes = event.memory_bytes ?? known.memory_bytes;
      known.changed_bytes = event.changed_bytes ?? known.changed_bytes;
      known.stored_bytes = event.stored_bytes ?? known.stored_bytes;
      known.freeze_seconds = event.freeze_seconds ?? known.freeze_seconds;
      if (event.action === 'failed') {
        known.error = event.message ?? known.error;
      }
    }
    if (event.action === 'restored' && event.kernel_id === this.kernelId) {
      this.restoredFrom = event.snapshot_id ?? null;
    }
    this._changed.emit();
    // New, finished or gone snapshots change the list itself: fetch it again.
    if (
      [
        'started',
        'completed',
        'failed',
        'deleted',
        'pruned',
        'restored',
        'schedule_changed',
        'hibernated',
        'woken',
        'wake_failed',
        'notebook_restored'
      ].includes(event.action)
    ) {
      void this.refresh();
    }
  }

  /** The snapshot the running kernel was restored from, if it is listed. */
  get origin(): ISnapshot | null {
    return this.snapshots.find(s => s.id === this.restoredFrom) ?? null;
  }

  /** Why restoring as a new kernel is not offered, or '' when it is. */
  get forkUnavailableReason(): string {
    if (!this.server) {
      return 'the server has not answered yet';
    }
    if (!this.server.features.restore_new) {
      return this.server.criu.available
        ? 'this server does not offer restoring as a new kernel'
        : `snapshots are disabled on this server: ${this.server.criu.reason}`;
    }
    return '';
  }

  private _changed = new Signal<this, void>(this);
  private _notebooks = new Map<string, Promise<INotebookDocument | null>>();
}

export type HibernationState = 'hibernating' | 'hibernated' | 'waking';

/** Which kernels are on disk, going there or waking (for the toolbar and the panel). */
export class KernelHibernation {
  constructor(private readonly client: Pick<CheckpointClient, 'kernel'>) {}

  get changed(): ISignal<this, string> {
    return this._changed;
  }

  state(kernelId: string | null): HibernationState | null {
    return kernelId ? (this._states.get(kernelId) ?? null) : null;
  }

  /** Ask the server about a kernel seen for the first time. */
  async load(kernelId: string): Promise<void> {
    try {
      const state = await this.client.kernel(kernelId);
      this.set(kernelId, state.hibernated ? 'hibernated' : null);
    } catch {
      // not a kernel the server can snapshot: never hibernated
    }
  }

  handleEvent(event: ISnapshotEvent): void {
    if (!event.kernel_id) {
      return;
    }
    const next: Record<string, HibernationState | null> = {
      hibernating: 'hibernating',
      hibernated: 'hibernated',
      hibernate_failed: null,
      waking: 'waking',
      woken: null,
      wake_failed: 'hibernated'
    };
    if (event.action in next) {
      this.set(event.kernel_id, next[event.action]);
    }
  }

  private set(kernelId: string, state: HibernationState | null): void {
    if (state) {
      this._states.set(kernelId, state);
    } else {
      this._states.delete(kernelId);
    }
    this._changed.emit(kernelId);
  }

  private _states = new Map<string, HibernationState>();
  private _changed = new Signal<this, string>(this);
}

export interface IRunning {
  snapshotId: string;
  status: string;
}

/**
 * Snapshots started from this browser, per kernel, until they end: drives the
 * toolbar button's progress and the result notifications.
 */
export class ProgressTracker {
  get changed(): ISignal<this, string> {
    return this._changed;
  }

  running(kernelId: string): IRunning | undefined {
    return this._running.get(kernelId);
  }

  /** Track a snapshot just started; resolves with its last event when it ends. */
  track(kernelId: string, snapshotId: string): Promise<ISnapshotEvent> {
    this._running.set(kernelId, { snapshotId, status: 'pending' });
    this._changed.emit(kernelId);
    const ended = this._ended.get(snapshotId);
    if (ended) {
      // Its end came before the answer to the request that started it.
      this.handleEvent(ended);
    }
    return new Promise<ISnapshotEvent>((resolve, reject) => {
      this._waiting.set(snapshotId, { resolve, reject });
      if (ended) {
        this.settle(ended);
      }
    });
  }

  handleEvent(event: ISnapshotEvent): void {
    if (!event.snapshot_id || !event.kernel_id) {
      return;
    }
    const ends = event.action === 'completed' || event.action === 'failed';
    if (ends) {
      this._ended.set(event.snapshot_id, event);
      if (this._ended.size > 100) {
        this._ended.delete(this._ended.keys().next().value as string);
      }
    }
    const current = this._running.get(event.kernel_id);
    if (current?.snapshotId !== event.snapshot_id) {
      return;
    }
    if (ends) {
      this._running.delete(event.kernel_id);
      this.settle(event);
    } else if (event.status) {
      current.status = event.status;
    }
    this._changed.emit(event.kernel_id);
  }

  private settle(event: ISnapshotEvent): void {
    const waiting = this._waiting.get(event.snapshot_id!);
    if (!waiting) {
      return;
    }
    this._waiting.delete(event.snapshot_id!);
    if (event.action === 'completed') {
      waiting.resolve(event);
    } else {
      waiting.reject(new Error(event.message || 'the snapshot failed'));
    }
  }

  private _running = new Map<string, IRunning>();
  private _ended = new Map<string, ISnapshotEvent>();
  private _waiting = new Map<
    string,
    { resolve: (e: ISnapshotEvent) => void; reject: (e: Error) => void }
  >();
  private _changed = new Signal<this, string>(this);
}

export interface IOrigin {
  id: string;
  label: string;
  created: string | null;
}

/** How a snapshot is named to users: its label (in quotes unless ``quoted`` is false), or when it was taken. */
export function snapshotName(
  s: { id: string; label?: string | null; created?: string | null },
  quoted = true
): string {
  if (s.label) {
    return quoted ? `“${s.label}”` : s.label;
  }
  return s.created
    ? `the snapshot of ${new Date(s.created).toLocaleString()}`
    : `snapshot ${s.id.slice(-6)}`;
}

/** Which snapshot each kernel's processes were restored from (for the toolbar). */
export class KernelOrigins {
  constructor(
    private readonly client: Pick<CheckpointClient, 'kernel' | 'get'>
  ) {}

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get(kernelId: string): IOrigin | null {
    return this._origins.get(kernelId) ?? null;
  }

  /** Ask the server about a kernel seen for the first time (or again after a change). */
  async load(kernelId: string): Promise<void> {
    try {
      const state = await this.client.kernel(kernelId);
      await this.set(kernelId, state.restored_from);
    } catch {
      // Not a kernel the server can snapshot (or gone): nothing to show.
    }
  }

  handleEvent(event: ISnapshotEvent): void {
    if (event.action === 'restored' && event.kernel_id && event.snapshot_id) {
      void this.set(event.kernel_id, event.snapshot_id);
    } else if (event.action === 'deleted' && event.snapshot_id) {
      for (const [kernelId, origin] of this._origins) {
        if (origin.id === event.snapshot_id) {
          this._origins.set(kernelId, {
            ...origin,
            label: `${snapshotName(origin, false)} (deleted)`
          });
        }
      }
      this._changed.emit();
    }
  }

  private async set(
    kernelId: string,
    snapshotId: string | null
  ): Promise<void> {
    if (!snapshotId) {
      this._origins.delete(kernelId);
    } else {
      const found = await this.client.get(snapshotId).catch(() => null);
      this._origins.set(kernelId, {
        id: snapshotId,
        label: found?.label ?? '',
        created: found?.created ?? null
      });
    }
    this._changed.emit();
  }

  private _origins = new Map<string, IOrigin>();
  private _changed = new Signal<this, void>(this);
}
