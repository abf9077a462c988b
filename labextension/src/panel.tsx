/**
 * The snapshots panel (a sidebar) and the notebook toolbar items.
 */
import { ReactWidget, UseSignal } from '@jupyterlab/apputils';
import {
  ToolbarButtonComponent,
  deleteIcon,
  downloadIcon,
  editIcon,
  fileUploadIcon,
  historyIcon,
  refreshIcon,
  undoIcon,
  copyIcon,
  notebookIcon,
  stopIcon,
  runIcon
} from '@jupyterlab/ui-components';
import * as React from 'react';

import { ISnapshot, formatBytes, formatSeconds } from './api';
import {
  INotebookChanges,
  KernelHibernation,
  KernelOrigins,
  ProgressTracker,
  SnapshotsModel,
  describeChanges,
  notebookChanges,
  snapshotName
} from './model';
import { snapshotIcon } from './icons';

/** What the panel's buttons do; the plugin implements them with dialogs. */
export interface IPanelActions {
  restore(snapshot: ISnapshot): void;
  fork(snapshot: ISnapshot): void;
  rename(snapshot: ISnapshot): void;
  remove(snapshot: ISnapshot): void;
  download(snapshot: ISnapshot): void;
  upload(): void;
  setSchedule(enabled: boolean, intervalSeconds: number): void;
  /** Show the notebook stored with the snapshot, read-only. */
  openNotebook(snapshot: ISnapshot): void;
  hibernate(): void;
  wake(): void;
}

const TRIGGER_TITLE: Record<string, string> = {
  manual: 'taken with the Snapshot button or the API',
  magic: 'taken with %checkpoint in the notebook',
  auto: 'taken by auto-backup',
  hibernate: 'taken when the kernel hibernated'
};

/** How the snapshot's notebook differs from the open one (fetched once). */
function NotebookChanges(props: {
  snapshot: ISnapshot;
  model: SnapshotsModel;
}): JSX.Element | null {
  const { snapshot, model } = props;
  const [changes, setChanges] = React.useState<INotebookChanges | null>(null);
  const current = model.currentDocument;
  React.useEffect(() => {
    let live = true;
    void model.notebookOf(snapshot).then(then => {
      if (live && then && current) {
        setChanges(notebookChanges(then, current));
      }
    });
    return () => {
      live = false;
    };
  }, [snapshot.id, model.documentVersion]);
  if (!snapshot.notebook) {
    return (
      <div className="jp-ckpt-notebook-changes">no notebook stored with it</div>
    );
  }
  return changes ? (
    <div
      className="jp-ckpt-notebook-changes"
      title="How the open notebook differs from the one stored with this snapshot"
    >
      {describeChanges(changes)}
    </div>
  ) : null;
}

function SnapshotRow(props: {
  snapshot: ISnapshot;
  model: SnapshotsModel;
  actions: IPanelActions;
}): JSX.Element {
  const { snapshot: s, model, actions } = props;
  const created = new Date(s.created);
  const done = s.status === 'complete';
  const forkReason = model.forkUnavailableReason;
  const isOrigin = model.restoredFrom === s.id;
  return (
    <li
      className={`jp-ckpt-row jp-ckpt-status-${s.status}${isOrigin ? ' jp-ckpt-origin' : ''}`}
      data-snapshot-id={s.id}
    >
      <div className="jp-ckpt-row-head">
        <span className="jp-ckpt-time" title={created.toString()}>
          {created.toLocaleString()}
        </span>
        <span
          className={`jp-ckpt-trigger jp-ckpt-trigger-${s.trigger}`}
          title={TRIGGER_TITLE[s.trigger] ?? ''}
        >
          {s.trigger}
        </span>
      </div>
      <div className="jp-ckpt-label">{s.label || <em>no label</em>}</div>
      <div className="jp-ckpt-facts">
        <span
          title={
            s.changed_bytes !== null && s.changed_bytes !== undefined
              ? `kernel memory, ${formatBytes(s.changed_bytes)} of it changed since the previous snapshot (the part copied while frozen)`
              : 'kernel memory'
          }
        >
          {formatBytes(s.memory_bytes)}
        </span>
        <span title="how long the kernel was frozen">
          frozen {formatSeconds(s.freeze_seconds)}
        </span>
        <span className="jp-ckpt-status" title={s.error ?? ''}>
          {s.status}
        </span>
        {model.showAll && s.path ? (
          <span title="notebook">{s.path}</span>
        ) : null}
      </div>
      {s.status === 'failed' && s.error ? (
        <div className="jp-ckpt-error">{s.error}</div>
      ) : null}
      {s.status === 'complete' ? (
        <NotebookChanges snapshot={s} model={model} />
      ) : null}
      {isOrigin ? (
        <div className="jp-ckpt-origin-note">
          the running kernel was restored from this snapshot
        </div>
      ) : null}
      <div className="jp-ckpt-actions">
        <ToolbarButtonComponent
          icon={undoIcon}
          label="Restore"
          tooltip="Restore the kernel to this snapshot"
          enabled={done}
          onClick={() => actions.restore(s)}
        />
        <ToolbarButtonComponent
          icon={copyIcon}
          label="Fork"
          tooltip={
            forkReason || 'Restore as a new kernel, in a copy of the notebook'
          }
          enabled={done && !forkReason}
          onClick={() => actions.fork(s)}
        />
        <ToolbarButtonComponent
          icon={notebookIcon}
          tooltip="Open the notebook stored with this snapshot (read-only)"
          enabled={done && !!s.notebook}
          onClick={() => actions.openNotebook(s)}
          dataset={{ action: 'open-notebook' }}
        />
        <ToolbarButtonComponent
          icon={editIcon}
          tooltip="Rename"
          enabled={s.status !== 'failed'}
          onClick={() => actions.rename(s)}
        />
        <ToolbarButtonComponent
          icon={downloadIcon}
          tooltip="Download as a bundle"
          enabled={done}
          onClick={() => actions.download(s)}
        />
        <ToolbarButtonComponent
          icon={deleteIcon}
          tooltip="Delete"
          onClick={() => actions.remove(s)}
        />
      </div>
    </li>
  );
}

function ScheduleControls(props: {
  model: SnapshotsModel;
  actions: IPanelActions;
}): JSX.Element | null {
  const { model, actions } = props;
  const schedule = model.schedule;
  const [minutes, setMinutes] = React.useState(
    schedule ? Math.round(schedule.interval_seconds / 60) : 30
  );
  React.useEffect(() => {
    if (schedule) {
      setMinutes(Math.round(schedule.interval_seconds / 60));
    }
  }, [schedule?.interval_seconds]);
  if (!schedule) {
    return null;
  }
  return (
    <div className="jp-ckpt-schedule">
      <label>
        <input
          type="checkbox"
          className="jp-ckpt-auto-backup"
          checked={schedule.enabled}
          onChange={e =>
            actions.setSchedule(e.currentTarget.checked, minutes * 60)
          }
        />{' '}
        Auto-backup every
      </label>
      <input
        type="number"
        min={1}
        className="jp-mod-styled jp-ckpt-interval"
        value={minutes}
        onChange={e =>
          setMinutes(Math.max(1, Number(e.currentTarget.value) || 1))
        }
        onBlur={() => actions.setSchedule(schedule.enabled, minutes * 60)}
      />{' '}
      min, keeping {schedule.keep}
    </div>
  );
}

function HibernationControls(props: {
  model: SnapshotsModel;
  actions: IPanelActions;
}): JSX.Element | null {
  const { model, actions } = props;
  const kernel = model.kernel;
  if (!kernel?.checkpointable) {
    return null;
  }
  return kernel.hibernated ? (
    <div className="jp-ckpt-hibernation">
      <span>
        Hibernated: the kernel is on disk and wakes when you run a cell.
      </span>
      <ToolbarButtonComponent
        icon={runIcon}
        label="Wake"
        tooltip="Restore the kernel now"
        onClick={() => actions.wake()}
      />
    </div>
  ) : (
    <div className="jp-ckpt-hibernation">
      <ToolbarButtonComponent
        icon={stopIcon}
        label="Hibernate"
        tooltip={`Put the kernel to disk and free its memory (${formatBytes(kernel.memory_bytes)}); it wakes when used`}
        onClick={() => actions.hibernate()}
      />
    </div>
  );
}

export class SnapshotsPanel extends ReactWidget {
  constructor(
    readonly model: SnapshotsModel,
    private readonly actions: IPanelActions
  ) {
    super();
    this.id = 'jupyter-ckpt-panel';
    this.addClass('jp-ckpt-panel');
    this.title.icon = snapshotIcon;
    this.title.caption = 'Snapshots';
  }

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this.model.changed}>
        {() => {
          const m = this.model;
          return (
            <div className="jp-ckpt-panel-body">
              <header className="jp-ckpt-header">
                <h2>Snapshots</h2>
                <div className="jp-ckpt-context">
                  {m.showAll ? 'all notebooks' : (m.path ?? 'no notebook open')}
                </div>
                <div className="jp-ckpt-header-actions">
                  <label title="Show the snapshots of every notebook">
                    <input
                      type="checkbox"
                      className="jp-ckpt-show-all"
                      checked={m.showAll}
                      onChange={e => void m.setShowAll(e.currentTarget.checked)}
                    />{' '}
                    all
                  </label>
                  <ToolbarButtonComponent
                    icon={fileUploadIcon}
                    tooltip="Upload a bundle"
                    onClick={() => this.actions.upload()}
                  />
                  <ToolbarButtonComponent
                    icon={refreshIcon}
                    tooltip="Refresh"
                    onClick={() => void m.refresh()}
                  />
                </div>
                {m.restoredFrom ? (
                  <div className="jp-ckpt-lineage">
                    <historyIcon.react
                      tag="span"
                      className="jp-ckpt-inline-icon"
                    />
                    <span>
                      The kernel runs from{' '}
                      {snapshotName(m.origin ?? { id: m.restoredFrom })}
                    </span>
                  </div>
                ) : null}
                <ScheduleControls model={m} actions={this.actions} />
                <HibernationControls model={m} actions={this.actions} />
                {m.server && !m.server.criu.available ? (
                  <div className="jp-ckpt-error">
                    Snapshots are disabled: {m.server.criu.reason}
                  </div>
                ) : null}
                {m.error ? (
                  <div className="jp-ckpt-error">{m.error}</div>
                ) : null}
              </header>
              {m.snapshots.length === 0 ? (
                <p className="jp-ckpt-empty">
                  No snapshots yet. Use the Snapshot button in the notebook
                  toolbar.
                </p>
              ) : (
                <ul className="jp-ckpt-list">
                  {m.snapshots.map(s => (
                    <SnapshotRow
                      key={s.id}
                      snapshot={s}
                      model={m}
                      actions={this.actions}
                    />
                  ))}
                </ul>
              )}
            </div>
          );
        }}
      </UseSignal>
    );
  }
}

const STATUS_WORD: Record<string, string> = {
  pending: 'Starting…',
  dumping: 'Freezing…',
  storing: 'Storing…',
  hibernating: 'Hibernating…',
  hibernated: 'Hibernated',
  waking: 'Waking…'
};

/** The notebook toolbar's Snapshot button: shows progress while one runs. */
export class SnapshotButton extends ReactWidget {
  constructor(
    private readonly progress: ProgressTracker,
    private readonly hibernation: KernelHibernation,
    private readonly kernelId: () => string | null,
    private readonly onClick: () => void
  ) {
    super();
    this.addClass('jp-ckpt-snapshot-button');
  }

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this.hibernation.changed}>
        {() => (
          <UseSignal signal={this.progress.changed}>
            {() => this.renderButton()}
          </UseSignal>
        )}
      </UseSignal>
    );
  }

  private renderButton(): JSX.Element {
    const kernelId = this.kernelId();
    const running = kernelId ? this.progress.running(kernelId) : undefined;
    const hibernation = this.hibernation.state(kernelId);
    const state = hibernation ?? running?.status;
    return (
      <ToolbarButtonComponent
        icon={snapshotIcon}
        label={state ? (STATUS_WORD[state] ?? 'Snapshot…') : 'Snapshot'}
        tooltip={
          hibernation === 'hibernated'
            ? 'The kernel is on disk; it wakes when you run a cell'
            : running
              ? `Snapshot ${running.snapshotId}: ${running.status}`
              : 'Snapshot the kernel (all of its memory, also mid-cell)'
        }
        enabled={!state && !!kernelId}
        onClick={this.onClick}
        dataset={{
          command: 'jupyter-ckpt:snapshot',
          ...(hibernation ? { hibernation } : {})
        }}
      />
    );
  }
}

/** Next to the button: which snapshot the notebook's kernel runs from. */
export class LineageIndicator extends ReactWidget {
  constructor(
    private readonly origins: KernelOrigins,
    private readonly kernelId: () => string | null
  ) {
    super();
    this.addClass('jp-ckpt-lineage-indicator');
  }

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this.origins.changed}>
        {() => {
          const kernelId = this.kernelId();
          const origin = kernelId ? this.origins.get(kernelId) : null;
          return origin ? (
            <span
              title={`The kernel was restored from ${snapshotName(origin)} (${origin.id})`}
            >
              <historyIcon.react tag="span" className="jp-ckpt-inline-icon" />{' '}
              from{' '}
              {origin.label ||
                (origin.created
                  ? new Date(origin.created).toLocaleTimeString()
                  : origin.id.slice(-6))}
            </span>
          ) : (
            <span />
          );
        }}
      </UseSignal>
    );
  }
}
