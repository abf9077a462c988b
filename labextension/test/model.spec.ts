/**
 * The panel model and the progress tracker, fed with the events the server
 * emits (schema snapshot/v1) and a stand-in for the API client.
 */
import { ISnapshot } from '../src/api';
import {
  KernelHibernation,
  KernelOrigins,
  ProgressTracker,
  describeChanges,
  notebookChanges,
  SNAPSHOT_SCHEMA,
  SnapshotsModel,
  isSnapshotEvent,
  snapshotName
} from '../src/model';

function snap(id: string, extra: Partial<ISnapshot> = {}): ISnapshot {
  return {
    id,
    kernel_id: 'k-1',
    kernel_name: 'python3',
    path: 'a.ipynb',
    label: '',
    trigger: 'manual',
    parent_id: null,
    created: '2026-11-28T07:16:50Z',
    status: 'complete',
    error: null,
    memory_bytes: 100,
    stored_bytes: 10,
    freeze_seconds: 0.05,
    total_seconds: 0.3,
    execution_count: 1,
    criu_version: '4.2.1',
    imported: null,
    notebook: 'saved',
    ...extra
  };
}

function fakeClient(
  snapshots: ISnapshot[],
  restoredFrom: string | null = null
) {
  const calls: unknown[] = [];
  return {
    calls,
    snapshots,
    async status() {
      return {
        version: '0.1.0',
        criu: { available: true, version: '4.2.1', reason: '' },
        store: { backend: 'local' },
        features: { snapshot: true, restore_replace: true, restore_new: true },
        previous_run: []
      };
    },
    async list(filter: { path?: string; kernelId?: string }) {
      calls.push(filter);
      return this.snapshots.filter(s => !filter.path || s.path === filter.path);
    },
    async kernel(id: string) {
      return {
        id,
        checkpointable: true,
        reason: '',
        busy: false,
        restored_from: restoredFrom,
        hibernated: id === 'k-asleep',
        hibernated_snapshot: id === 'k-asleep' ? '01A' : null,
        memory_bytes: id === 'k-asleep' ? 0 : 1000
      };
    },
    notebookCalls: [] as string[],
    async notebook(id: string) {
      this.notebookCalls.push(id);
      return {
        cells: [{ id: 'c1', cell_type: 'code', source: 'x = 1' }],
        nbformat: 4,
        nbformat_minor: 5
      };
    },
    async schedule() {
      return { enabled: true, interval_seconds: 1800, keep: 10 };
    },
    async get(id: string) {
      const found = this.snapshots.find(s => s.id === id);
      if (!found) {
        throw new Error('not found');
      }
      return found;
    }
  };
}

describe('SnapshotsModel', () => {
  it("lists the current notebook's snapshots newest first, and all on request", async () => {
    const client = fakeClient([
      snap('01A'),
      snap('01C'),
      snap('01B', { path: 'other.ipynb' })
    ]);
    const model = new SnapshotsModel(client);
    let changes = 0;
    model.changed.connect(() => changes++);
    await model.setContext('a.ipynb', 'k-1');
    expect(model.snapshots.map(s => s.id)).toEqual(['01C', '01A']);
    expect(client.calls).toEqual([{ path: 'a.ipynb' }]);
    expect(model.schedule).toEqual({
      enabled: true,
      interval_seconds: 1800,
      keep: 10
    });
    await model.setShowAll(true);
    expect(model.snapshots.map(s => s.id)).toEqual(['01C', '01B', '01A']);
    expect(changes).toBeGreaterThanOrEqual(2);
  });

  it('knows which snapshot the kernel runs from, and follows restores', async () => {
    const client = fakeClient(
      [snap('01A', { label: 'clean data' }), snap('01B')],
      '01A'
    );
    const model = new SnapshotsModel(client);
    await model.setContext('a.ipynb', 'k-1');
    expect(model.origin?.label).toBe('clean data');
    model.handleEvent({
      action: 'restored',
      snapshot_id: '01B',
      kernel_id: 'k-1',
      status: 'complete'
    });
    expect(model.restoredFrom).toBe('01B');
    model.handleEvent({
      action: 'restored',
      snapshot_id: '01A',
      kernel_id: 'another kernel'
    });
    expect(model.restoredFrom).toBe('01B');
  });

  it('updates a snapshot in place from its events', async () => {
    const client = fakeClient([
      snap('01A', { status: 'dumping', memory_bytes: 0 })
    ]);
    const model = new SnapshotsModel(client);
    await model.setContext('a.ipynb', 'k-1');
    client.snapshots = [
      snap('01A', { status: 'failed', error: 'No space left on device' })
    ];
    model.handleEvent({
      action: 'failed',
      snapshot_id: '01A',
      kernel_id: 'k-1',
      status: 'failed',
      message: 'No space left on device'
    });
    expect(model.snapshots[0].status).toBe('failed');
    expect(model.snapshots[0].error).toBe('No space left on device');
  });

  it('says why forking is not offered', async () => {
    const client = fakeClient([]);
    const model = new SnapshotsModel({
      ...client,
      status: async () => ({
        version: '0.1.0',
        criu: {
          available: false,
          version: null,
          reason: 'CRIU is not installed'
        },
        store: { backend: 'local' },
        features: {
          snapshot: false,
          restore_replace: false,
          restore_new: false
        },
        previous_run: []
      })
    });
    expect(model.forkUnavailableReason).toBe('the server has not answered yet');
    await model.refresh();
    expect(model.forkUnavailableReason).toBe(
      'snapshots are disabled on this server: CRIU is not installed'
    );
  });
});

describe('ProgressTracker', () => {
  it('follows a snapshot through its statuses and resolves with its result', async () => {
    const tracker = new ProgressTracker();
    const done = tracker.track('k-1', '01A');
    expect(tracker.running('k-1')).toEqual({
      snapshotId: '01A',
      status: 'pending'
    });
    tracker.handleEvent({
      action: 'started',
      snapshot_id: '01A',
      kernel_id: 'k-1',
      status: 'dumping'
    });
    expect(tracker.running('k-1')?.status).toBe('dumping');
    tracker.handleEvent({
      action: 'storing',
      snapshot_id: '01A',
      kernel_id: 'k-1',
      status: 'storing'
    });
    expect(tracker.running('k-1')?.status).toBe('storing');
    tracker.handleEvent({
      action: 'completed',
      snapshot_id: '01A',
      kernel_id: 'k-1',
      status: 'complete',
      freeze_seconds: 0.2,
      memory_bytes: 2048
    });
    await expect(done).resolves.toMatchObject({
      freeze_seconds: 0.2,
      memory_bytes: 2048
    });
    expect(tracker.running('k-1')).toBeUndefined();
  });

  it("rejects with the server's reason when the snapshot fails", async () => {
    const tracker = new ProgressTracker();
    const done = tracker.track('k-1', '01A');
    tracker.handleEvent({
      action: 'failed',
      snapshot_id: '01A',
      kernel_id: 'k-1',
      status: 'failed',
      message: "Can't dump half of stream unix connection"
    });
    await expect(done).rejects.toThrow(
      "Can't dump half of stream unix connection"
    );
  });

  it('handles an end that arrives before the request that started it returns', async () => {
    const tracker = new ProgressTracker();
    tracker.handleEvent({
      action: 'completed',
      snapshot_id: '01A',
      kernel_id: 'k-1',
      status: 'complete'
    });
    await expect(tracker.track('k-1', '01A')).resolves.toMatchObject({
      action: 'completed'
    });
    expect(tracker.running('k-1')).toBeUndefined();
  });

  it('ignores other kernels and other snapshots', () => {
    const tracker = new ProgressTracker();
    void tracker.track('k-1', '01A');
    tracker.handleEvent({
      action: 'started',
      snapshot_id: '01B',
      kernel_id: 'k-2',
      status: 'dumping'
    });
    expect(tracker.running('k-1')?.status).toBe('pending');
    expect(tracker.running('k-2')).toBeUndefined();
  });
});

describe('events and names', () => {
  it("recognises jupyter-ckpt's events", () => {
    expect(isSnapshotEvent({ schema_id: SNAPSHOT_SCHEMA })).toBe(true);
    expect(
      isSnapshotEvent({
        schema_id: 'https://events.jupyter.org/jupyter_server/kernel_actions/v1'
      })
    ).toBe(false);
  });

  it('names a snapshot by its label, else by its time', () => {
    expect(snapshotName({ id: '01A', label: 'clean data' })).toBe(
      '“clean data”'
    );
    expect(snapshotName({ id: '01ABCDEF', label: '' })).toBe('snapshot ABCDEF');
    expect(
      snapshotName({ id: '01A', created: '2026-11-28T07:16:50Z' })
    ).toMatch(/^the snapshot of /);
  });

  it('remembers which snapshot each kernel came from', async () => {
    const client = fakeClient([snap('01A', { label: 'v1' })], '01A');
    const origins = new KernelOrigins(client);
    await origins.load('k-1');
    expect(origins.get('k-1')).toMatchObject({ id: '01A', label: 'v1' });
    origins.handleEvent({
      action: 'deleted',
      snapshot_id: '01A',
      kernel_id: 'k-1'
    });
    expect(origins.get('k-1')?.label).toBe('v1 (deleted)');
  });

  it("fetches a snapshot's notebook once, and none for a snapshot without one", async () => {
    const client = fakeClient([snap('01A'), snap('01B', { notebook: null })]);
    const model = new SnapshotsModel(client);
    await model.setContext('a.ipynb', 'k-1');
    const [b, a] = model.snapshots;
    expect(await model.notebookOf(b)).toBeNull();
    expect((await model.notebookOf(a))?.cells).toHaveLength(1);
    await model.notebookOf(a);
    expect(client.notebookCalls).toEqual(['01A']);
  });
});

describe('notebookChanges', () => {
  const cell = (id: string | undefined, source: string | string[]) => ({
    ...(id ? { id } : {}),
    cell_type: 'code',
    source
  });
  const doc = (...cells: ReturnType<typeof cell>[]) => ({
    cells,
    nbformat: 4,
    nbformat_minor: 5
  });

  it('counts cells added, removed and changed, matched by id', () => {
    const then = doc(cell('a', 'x = 1'), cell('b', 'y = 2'), cell('c', 'z'));
    const now = doc(
      cell('a', ['x = ', '1']),
      cell('c', 'z = 3'),
      cell('d', 'new'),
      cell('e', 'new too')
    );
    const changes = notebookChanges(then, now);
    expect(changes).toEqual({ added: 2, removed: 1, changed: 1 });
    expect(describeChanges(changes)).toBe(
      'cells since: 2 added, 1 removed, 1 changed'
    );
    expect(describeChanges(notebookChanges(then, then))).toBe('same cells');
  });

  it('matches cells without ids by position', () => {
    const changes = notebookChanges(
      doc(cell(undefined, 'a'), cell(undefined, 'b')),
      doc(cell(undefined, 'a'), cell(undefined, 'B'), cell(undefined, 'c'))
    );
    expect(changes).toEqual({ added: 1, removed: 0, changed: 1 });
  });
});

describe('KernelHibernation', () => {
  it('follows hibernation and waking from the events, and asks the server once', async () => {
    const hibernation = new KernelHibernation(fakeClient([]));
    await hibernation.load('k-asleep');
    expect(hibernation.state('k-asleep')).toBe('hibernated');
    await hibernation.load('k-1');
    expect(hibernation.state('k-1')).toBeNull();
    const seen: (string | null)[] = [];
    hibernation.changed.connect((_, id) => seen.push(hibernation.state(id)));
    for (const action of ['hibernating', 'hibernated', 'waking', 'woken']) {
      hibernation.handleEvent({ action, kernel_id: 'k-1' });
    }
    expect(seen).toEqual(['hibernating', 'hibernated', 'waking', null]);
    hibernation.handleEvent({ action: 'wake_failed', kernel_id: 'k-1' });
    expect(hibernation.state('k-1')).toBe('hibernated');
    expect(hibernation.state(null)).toBeNull();
  });
});
