/**
 * jupyter-ckpt's JupyterLab 4 / Notebook 7 extension: a Snapshot button in every
 * notebook toolbar (with a palette command and a shortcut), which snapshot the
 * kernel runs from, and a snapshots panel in the right sidebar.
 *
 * Talks to the server only through the REST API (api.ts) and the server's event
 * stream (schema snapshot/v1).
 */
import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  IToolbarWidgetRegistry,
  InputDialog,
  Notification,
  showDialog
} from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';

import {
  CheckpointClient,
  CheckpointError,
  ISnapshot,
  formatBytes,
  formatSeconds
} from './api';
import { snapshotIcon } from './icons';
import {
  ISnapshotEvent,
  KernelOrigins,
  ProgressTracker,
  SnapshotsModel,
  isSnapshotEvent,
  snapshotName
} from './model';
import {
  IPanelActions,
  LineageIndicator,
  SnapshotButton,
  SnapshotsPanel
} from './panel';

const PLUGIN_ID = 'jupyter-ckpt:plugin';

export const CommandIDs = {
  snapshot: 'jupyter-ckpt:snapshot',
  openPanel: 'jupyter-ckpt:open-panel'
};

function kernelOf(panel: NotebookPanel | null | undefined): string | null {
  return panel?.sessionContext.session?.kernel?.id ?? null;
}

function reason(error: unknown): string {
  return error instanceof CheckpointError || error instanceof Error
    ? error.message
    : String(error);
}

/** A notification while ``work`` runs, then its result or the reason it failed. */
async function notifying<T>(
  work: Promise<T>,
  pending: string,
  success: (out: T) => string,
  failure: string
): Promise<T | null> {
  const id = Notification.emit(pending, 'in-progress', { autoClose: false });
  try {
    const out = await work;
    Notification.update({
      id,
      message: success(out),
      type: 'success',
      autoClose: 5000
    });
    return out;
  } catch (error) {
    Notification.update({
      id,
      message: `${failure}: ${reason(error)}`,
      type: 'error',
      autoClose: false
    });
    return null;
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Snapshot button and snapshots panel for jupyter-ckpt',
  autoStart: true,
  requires: [INotebookTracker, IToolbarWidgetRegistry, IDocumentManager],
  optional: [ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    toolbarRegistry: IToolbarWidgetRegistry,
    docManager: IDocumentManager,
    palette: ICommandPalette | null
  ) => {
    const client = new CheckpointClient(app.serviceManager.serverSettings);
    const model = new SnapshotsModel(client);
    const progress = new ProgressTracker();
    const origins = new KernelOrigins(client);

    app.serviceManager.events.stream.connect((_, emission) => {
      if (!isSnapshotEvent(emission)) {
        return;
      }
      const event = emission as unknown as ISnapshotEvent;
      progress.handleEvent(event);
      model.handleEvent(event);
      origins.handleEvent(event);
    });

    /** Snapshot a notebook's kernel, with progress on its button and a notification. */
    async function snapshotNotebook(
      panel: NotebookPanel | null,
      label = ''
    ): Promise<ISnapshot | null> {
      const kernelId = kernelOf(panel);
      if (!panel || !kernelId) {
        Notification.warning(
          'This notebook has no running kernel to snapshot.',
          { autoClose: 5000 }
        );
        return null;
      }
      let started: ISnapshot;
      try {
        started = await client.snapshot(kernelId, label);
      } catch (error) {
        Notification.error(`Snapshot not taken: ${reason(error)}`, {
          autoClose: false
        });
        return null;
      }
      const note = Notification.emit(
        `Snapshotting the kernel of ${panel.context.path}…`,
        'in-progress',
        { autoClose: false }
      );
      try {
        const done = await progress.track(kernelId, started.id);
        Notification.update({
          id: note,
          message:
            `Snapshot saved: ${formatBytes(done.memory_bytes)} of kernel memory, kernel frozen ` +
            `${formatSeconds(done.freeze_seconds)}, ${formatBytes(done.stored_bytes)} new in the store.`,
          type: 'success',
          autoClose: 6000
        });
        return await client.get(started.id);
      } catch (error) {
        Notification.update({
          id: note,
          message: `Snapshot failed: ${reason(error)}`,
          type: 'error',
          autoClose: false
        });
        return null;
      }
    }

    const actions: IPanelActions = {
      async restore(s) {
        const panel = tracker.currentWidget;
        const current =
          panel && panel.context.path === s.path ? kernelOf(panel) : null;
        const result = await showDialog({
          title: 'Restore this snapshot?',
          body:
            `The kernel of ${s.path ?? 'its notebook'} goes back to ${snapshotName(s)}: ` +
            'its variables, running cells and threads become what they were then.',
          checkbox: current
            ? { label: 'Snapshot the current state first', checked: true }
            : null,
          buttons: [
            Dialog.cancelButton(),
            Dialog.warnButton({ label: 'Restore' })
          ]
        });
        if (!result.button.accept) {
          return;
        }
        if (result.isChecked && current) {
          const saved = await snapshotNotebook(
            panel,
            `before restoring ${snapshotName(s, false)}`
          );
          if (!saved) {
            return; // keep what the user would have lost
          }
        }
        await notifying(
          client.restore(
            s.id,
            current
              ? { mode: 'replace', kernel_id: current }
              : { mode: 'replace' }
          ),
          `Restoring ${snapshotName(s)}…`,
          out =>
            `Kernel restored from the snapshot in ${formatSeconds(out.total_seconds)}.`,
          'Restore failed'
        );
        await model.refresh();
      },

      async fork(s) {
        const outcome = await notifying(
          client.restore(
            s.id,
            s.path ? { mode: 'new', copy: true } : { mode: 'new' }
          ),
          `Starting a new kernel from ${snapshotName(s)}…`,
          out =>
            `New kernel from the snapshot${out.path ? ` in ${out.path}` : ''}, in ${formatSeconds(out.total_seconds)}.`,
          'Fork failed'
        );
        if (outcome?.path) {
          docManager.openOrReveal(outcome.path);
        }
      },

      async rename(s) {
        const result = await InputDialog.getText({
          title: 'Rename snapshot',
          text: s.label,
          okLabel: 'Rename'
        });
        if (result.button.accept && result.value !== null) {
          await client
            .relabel(s.id, result.value)
            .catch(error =>
              Notification.error(`Not renamed: ${reason(error)}`)
            );
          await model.refresh();
        }
      },

      async remove(s) {
        const result = await showDialog({
          title: 'Delete this snapshot?',
          body: `${snapshotName(s)} is deleted for good.`.replace(/^t/, 'T'),
          buttons: [
            Dialog.cancelButton(),
            Dialog.warnButton({ label: 'Delete' })
          ]
        });
        if (result.button.accept) {
          await client
            .remove(s.id)
            .catch(error =>
              Notification.error(`Not deleted: ${reason(error)}`)
            );
          await model.refresh();
        }
      },

      download(s) {
        const link = document.createElement('a');
        link.href = client.bundleUrl(s.id);
        link.download = `${s.id}.jckpt`;
        document.body.appendChild(link);
        link.click();
        link.remove();
      },

      upload() {
        const input = document.createElement('input');
        input.type = 'file';
        input.accept = '.jckpt';
        input.onchange = async () => {
          const file = input.files?.[0];
          if (!file) {
            return;
          }
          try {
            const s = await client
              .uploadBundle(file, false)
              .catch(async error => {
                if (
                  !(error instanceof CheckpointError) ||
                  error.status !== 409
                ) {
                  throw error;
                }
                const answer = await showDialog({
                  title: 'Trust this bundle?',
                  body: `${error.message}. Import it anyway, signed again with this server's key?`,
                  buttons: [
                    Dialog.cancelButton(),
                    Dialog.okButton({ label: 'Trust and import' })
                  ]
                });
                if (!answer.button.accept) {
                  return null;
                }
                return client.uploadBundle(file, true);
              });
            if (s) {
              Notification.success(`Imported ${snapshotName(s)}.`, {
                autoClose: 5000
              });
              await model.refresh();
            }
          } catch (error) {
            Notification.error(`Bundle not imported: ${reason(error)}`, {
              autoClose: false
            });
          }
        };
        input.click();
      },

      async setSchedule(enabled, intervalSeconds) {
        if (!model.kernelId) {
          return;
        }
        await client
          .setSchedule(model.kernelId, {
            enabled,
            interval_seconds: intervalSeconds
          })
          .catch(error =>
            Notification.error(`Auto-backup not changed: ${reason(error)}`)
          );
        await model.refresh();
      }
    };

    const panel = new SnapshotsPanel(model, actions);
    app.shell.add(panel, 'right', { rank: 650 });

    // The panel follows the current notebook and its kernel.
    const follow = () => {
      const current = tracker.currentWidget;
      void model.setContext(current?.context.path ?? null, kernelOf(current));
    };
    tracker.currentChanged.connect(follow);
    tracker.widgetAdded.connect((_, nb) => {
      nb.sessionContext.kernelChanged.connect(follow);
      nb.context.pathChanged.connect(follow);
    });
    follow();

    toolbarRegistry.addFactory<NotebookPanel>(
      'Notebook',
      'ckpt-snapshot',
      nb => {
        const button = new SnapshotButton(
          progress,
          () => kernelOf(nb),
          () => void snapshotNotebook(nb)
        );
        nb.sessionContext.kernelChanged.connect(() => button.update());
        return button;
      }
    );
    toolbarRegistry.addFactory<NotebookPanel>(
      'Notebook',
      'ckpt-lineage',
      nb => {
        const indicator = new LineageIndicator(origins, () => kernelOf(nb));
        const load = () => {
          const kernelId = kernelOf(nb);
          if (kernelId) {
            void origins.load(kernelId);
          }
        };
        nb.sessionContext.kernelChanged.connect(load);
        nb.sessionContext.statusChanged.connect((_, status) => {
          if (status === 'restarting' || status === 'autorestarting') {
            setTimeout(load, 1000); // a restarted kernel no longer runs from a snapshot
          }
        });
        void nb.sessionContext.ready.then(load);
        return indicator;
      }
    );

    app.commands.addCommand(CommandIDs.snapshot, {
      label: 'Snapshot Kernel',
      caption:
        "Snapshot the current notebook's kernel: all of its memory, also in the middle of a cell",
      icon: snapshotIcon,
      isEnabled: () => !!kernelOf(tracker.currentWidget),
      execute: () => snapshotNotebook(tracker.currentWidget)
    });
    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Show Snapshots',
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      palette.addItem({ command: CommandIDs.snapshot, category: 'Snapshots' });
      palette.addItem({ command: CommandIDs.openPanel, category: 'Snapshots' });
    }
  }
};

export default plugin;
