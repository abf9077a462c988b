/**
 * The client of jupyter-ckpt's REST API (/api/ckpt, described in the Python
 * package's openapi.yaml). The frontend talks to the server only through this
 * and the server's event stream.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export type SnapshotStatus =
  'pending' | 'dumping' | 'storing' | 'complete' | 'failed';

export interface ISnapshot {
  id: string;
  kernel_id: string;
  kernel_name: string;
  path: string | null;
  label: string;
  trigger: 'manual' | 'magic' | 'auto' | 'hibernate';
  parent_id: string | null;
  created: string;
  status: SnapshotStatus;
  error: string | null;
  memory_bytes: number;
  /**
   * Of memory_bytes, what the kernel wrote since its previous snapshot: the
   * only part copied while it was frozen. null: a full snapshot.
   */
  changed_bytes: number | null;
  /** New bytes this snapshot added to the store. */
  stored_bytes: number;
  freeze_seconds: number | null;
  total_seconds: number | null;
  execution_count: number | null;
  criu_version: string | null;
  /** Set when the snapshot came in a bundle. */
  imported: IImport | null;
  /** Where the notebook stored with it came from; null: none stored. */
  notebook: 'browser' | 'live' | 'saved' | null;
}

export interface IImport {
  /** When it was imported here. */
  at: string;
  /** Fingerprint of the key that signed the bundle ('unknown' if it named none). */
  signer: string;
  /** The signature verified with this store's key; false: imported trusting its origin. */
  verified: boolean;
}

export interface IServerStatus {
  version: string;
  criu: { available: boolean; version: string | null; reason: string };
  store: { backend: string };
  /** What tells the pages a kernel wrote since its last snapshot (off, none: every snapshot is full). */
  dirty_tracking: 'soft-dirty' | 'userfaultfd' | 'none' | 'off';
  /** What the server can do now: snapshot, restore_replace, restore_new, lazy_restore, ... */
  features: Record<string, boolean>;
  /** The kernels a previous server left when it stopped without warning (null while the server still mends them). */
  previous_run: IPreviousRunKernel[] | null;
}

export interface IPreviousRunKernel {
  kernel_id: string;
  /** Nothing newer than its latest snapshot remains. */
  lost: boolean;
  /** The snapshot its state was saved as. */
  snapshot_id: string | null;
  message: string;
}

export interface IKernelState {
  id: string;
  checkpointable: boolean;
  reason: string;
  busy: boolean;
  restored_from: string | null;
  /** Its processes are on disk (the snapshot hibernated_snapshot); it wakes when used. */
  hibernated: boolean;
  hibernated_snapshot: string | null;
  /** Resident memory of its processes (0 while hibernated). */
  memory_bytes: number;
}

export interface IHibernation {
  kernel_id: string;
  /** The snapshot it wakes from. */
  snapshot_id: string;
  /** Resident memory its processes held. */
  memory_freed_bytes: number;
  freeze_seconds: number;
  /** Until its processes were gone. */
  total_seconds: number;
}

export interface ISchedule {
  enabled: boolean;
  interval_seconds: number;
  keep: number;
}

export interface IRestoreOptions {
  mode: 'replace' | 'new';
  kernel_id?: string;
  path?: string;
  copy?: boolean;
  /** replace: also put the snapshot's notebook back (the current one becomes the file's checkpoint). */
  notebook?: boolean;
}

export interface IRestoreOutcome {
  snapshot_id: string;
  kernel_id: string;
  /** The restore's mode: 'replace' or 'new' (openapi.yaml types it as a plain string). */
  mode: 'replace' | 'new';
  save_previous_seconds: number;
  restore_seconds: number;
  total_seconds: number;
  path: string | null;
  prepare_seconds: number;
  /** The kernel answered before all of its memory was back (CRIU's lazy pages). */
  lazy: boolean;
  /** replace: the snapshot's notebook was put back too, at path. */
  notebook: boolean;
}

/** A notebook document (nbformat 4), as the server stores it with a snapshot. */
export interface INotebookDocument {
  cells: {
    id?: string;
    cell_type: string;
    source: string | string[];
    outputs?: unknown[];
  }[];
  metadata?: Record<string, unknown>;
  nbformat: number;
  nbformat_minor: number;
}

/** A refusal or failure, with the server's own reason. */
export class CheckpointError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
    this.name = 'CheckpointError';
  }
}

export class CheckpointClient {
  constructor(
    readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {}

  status(): Promise<IServerStatus> {
    return this.request('status');
  }

  /** Snapshots, newest first: of one notebook, one kernel, or all. */
  list(
    filter: { path?: string; kernelId?: string } = {}
  ): Promise<ISnapshot[]> {
    const query: Record<string, string> = {};
    if (filter.path) {
      query.path = filter.path;
    }
    if (filter.kernelId) {
      query.kernel_id = filter.kernelId;
    }
    const search = URLExt.objectToQueryString(query);
    return this.request(`snapshots${search}`);
  }

  get(snapshotId: string): Promise<ISnapshot> {
    return this.request(`snapshots/${enc(snapshotId)}`);
  }

  /**
   * Start a snapshot; it answers at once (status "pending"), progress comes as
   * events. ``notebook``: the document as shown here, stored with it.
   */
  snapshot(
    kernelId: string,
    label = '',
    notebook?: unknown
  ): Promise<ISnapshot> {
    return this.request(`kernels/${enc(kernelId)}/snapshots`, 'POST', {
      label,
      ...(notebook ? { notebook } : {})
    });
  }

  /** The notebook document stored with a snapshot. */
  notebook(snapshotId: string): Promise<INotebookDocument> {
    return this.request(`snapshots/${enc(snapshotId)}/notebook`);
  }

  /** Put the kernel to disk: its processes stop, it stays listed, it wakes when used. */
  hibernate(kernelId: string): Promise<IHibernation> {
    return this.request(`kernels/${enc(kernelId)}/hibernate`, 'POST');
  }

  wake(kernelId: string): Promise<IRestoreOutcome> {
    return this.request(`kernels/${enc(kernelId)}/wake`, 'POST');
  }

  relabel(snapshotId: string, label: string): Promise<ISnapshot> {
    return this.request(`snapshots/${enc(snapshotId)}`, 'PATCH', { label });
  }

  remove(snapshotId: string): Promise<void> {
    return this.request(`snapshots/${enc(snapshotId)}`, 'DELETE');
  }

  restore(
    snapshotId: string,
    options: IRestoreOptions
  ): Promise<IRestoreOutcome> {
    return this.request(
      `snapshots/${enc(snapshotId)}/restore`,
      'POST',
      options
    );
  }

  kernel(kernelId: string): Promise<IKernelState> {
    return this.request(`kernels/${enc(kernelId)}`);
  }

  schedule(kernelId: string): Promise<ISchedule> {
    return this.request(`kernels/${enc(kernelId)}/schedule`);
  }

  setSchedule(
    kernelId: string,
    schedule: Partial<ISchedule>
  ): Promise<ISchedule> {
    return this.request(`kernels/${enc(kernelId)}/schedule`, 'PUT', schedule);
  }

  /** Where the browser downloads a snapshot's bundle (the session cookie authenticates it). */
  bundleUrl(snapshotId: string): string {
    return URLExt.join(
      this.settings.baseUrl,
      'api/ckpt/snapshots',
      enc(snapshotId),
      'bundle'
    );
  }

  uploadBundle(bundle: Blob, trust: boolean): Promise<ISnapshot> {
    return this.request(
      `bundles?trust=${trust ? 'true' : 'false'}`,
      'POST',
      bundle
    );
  }

  private async request<T>(
    path: string,
    method = 'GET',
    body?: unknown
  ): Promise<T> {
    const url = URLExt.join(this.settings.baseUrl, 'api/ckpt', path);
    const init: RequestInit = { method };
    if (body instanceof Blob) {
      init.body = body;
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
    }
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this.settings);
    } catch (error) {
      throw new CheckpointError(
        0,
        `cannot reach the Jupyter server: ${String(error)}`
      );
    }
    const text = await response.text();
    let data: any = undefined;
    try {
      data = text ? JSON.parse(text) : undefined;
    } catch {
      data = undefined;
    }
    if (!response.ok) {
      const reason =
        (data && (data.message || data.reason)) ||
        response.statusText ||
        `HTTP ${response.status}`;
      throw new CheckpointError(response.status, reason);
    }
    return data as T;
  }
}

function enc(part: string): string {
  return encodeURIComponent(part);
}

/** 1.2 GiB, 340 MiB, 12 KiB. */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined) {
    return '–';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value >= 10 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

export function formatSeconds(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined) {
    return '–';
  }
  return seconds < 10 ? `${seconds.toFixed(2)} s` : `${seconds.toFixed(0)} s`;
}
