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
  MainAreaWidget,
  Notification,
  showDialog
} from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';

import {
  CheckpointClient,
  CheckpointError,
  INotebookDocument,
  ISnapshot,
  formatBytes,
  formatSeconds
} from './api';
import { snapshotIcon } from './icons';
import {
  ISnapshotEvent,
  KernelHibernation,
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
  openPanel: 'jupyter-ckpt:open-panel',
  hibernate: 'jupyter-ckpt:hibernate',
  wake: 'jupyter-ckpt:wake'
};

function kernelOf(panel: NotebookPanel | null | undefined): string | null {
  return panel?.sessionContext.session?.kernel?.id ?? null;
}

/** The notebook as this browser shows it, unsaved edits included. */
function documentOf(
  panel: NotebookPanel | null | undefined
): INotebookDocument | null {
  const json = panel?.content.model?.toJSON();
  return json ? (json as unknown as INotebookDocument) : null;
}

/** The restore dialog's body: its two choices. */
class RestoreChoices extends Widget {
  constructor(text: string, canSaveFirst: boolean, hasNotebook: boolean) {
    super();
    this.addClass('jp-ckpt-restore-choices');
    const p = document.createElement('p');
    p.textContent = text;
    this.node.appendChild(p);
    this.saveFirst = this.choice(
      'Snapshot the current state first',
      canSaveFirst,
      'jp-ckpt-save-first'
    );
    this.withNotebook = this.choice(
      hasNotebook
        ? 'Also restore the notebook (the current one is kept as its checkpoint: File > Revert)'
        : 'Also restore the notebook (none was stored with this snapshot)',
      hasNotebook,
      'jp-ckpt-with-notebook',
      false
    );
  }

  getValue(): { saveFirst: boolean; notebook: boolean } {
    return {
      saveFirst: !!this.saveFirst?.checked,
      notebook: !!this.withNotebook?.checked
    };
  }

  private choice(
    label: string,
    enabled: boolean,
    className: string,
    checked = true
  ): HTMLInputElement | null {
    const row = document.createElement('label');
    row.className = className;
    const box = document.createElement('input');
    box.type = 'checkbox';
    box.checked = enabled && checked;
    box.disabled = !enabled;
    row.append(box, ` ${label}`);
    this.node.appendChild(row);
    return box;
  }

  private saveFirst: HTMLInputElement | null;
  private withNotebook: HTMLInputElement | null;
}

/** A read-only view of a notebook document: its cells and their text outputs. */
function notebookView(doc: INotebookDocument, title: string): Widget {
  const content = new Widget();
  content.addClass('jp-ckpt-notebook-view');
  for (const cell of doc.cells) {
    const block = document.createElement('div');
    block.className = `jp-ckpt-view-cell jp-ckpt-view-${cell.cell_type}`;
    const source = document.createElement('pre');
    source.textContent = Array.isArray(cell.source)
      ? cell.source.join('')
      : cell.source;
    block.appendChild(source);
    for (const output of (cell.outputs ?? []) as any[]) {
      const text =
        output.text ??
        output.data?.['text/plain'] ??
        (output.ename ? `${output.ename}: ${output.evalue}` : '');
      if (text) {
        const out = document.createElement('pre');
        out.className = 'jp-ckpt-view-output';
        out.textContent = Array.isArray(text) ? text.join('') : String(text);
        block.appendChild(out);
      }
    }
    content.node.appendChild(block);
  }
  const widget = new MainAreaWidget({ content });
  widget.title.label = title;
  widget.title.closable = true;
  return widget;
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
    const hibernation = new KernelHibernation(client);

    app.serviceManager.events.stream.connect((_, emission) => {
      if (!isSnapshotEvent(emission)) {
        return;
      }
      const event = emission as unknown as ISnapshotEvent;
      progress.handleEvent(event);
      model.handleEvent(event);
      origins.handleEvent(event);
      hibernation.handleEvent(event);
      if (event.action === 'notebook_restored' && event.path) {
        // The file was replaced on the server: every open view of it shows it now.
        tracker.forEach(nb => {
          if (nb.context.path === event.path) {
            void nb.context.revert();
          }
        });
      }
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
        started = await client.snapshot(kernelId, label, documentOf(panel));
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
            `Snapshot saved: ${formatBytes(done.memory_bytes)} of kernel memory` +
            (done.changed_bytes !== null && done.changed_bytes !== undefined
              ? ` (${formatBytes(done.changed_bytes)} changed since the last snapshot)`
              : '') +
            `, kernel frozen ${formatSeconds(done.freeze_seconds)}, ` +
            `${formatBytes(done.stored_bytes)} new in the store.`,
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
          body: new RestoreChoices(
            `The kernel of ${s.path ?? 'its notebook'} goes back to ${snapshotName(s)}: ` +
              'its variables, running cells and threads become what they were then.',
            !!current,
            !!s.notebook
          ),
          buttons: [
            Dialog.cancelButton(),
            Dialog.warnButton({ label: 'Restore' })
          ]
        });
        if (!result.button.accept || !result.value) {
          return;
        }
        const choices = result.value;
        if (
          choices.notebook &&
          panel?.context.path === s.path &&
          panel?.context.model.dirty
        ) {
          // Unsaved edits go into the file first, so the file's checkpoint keeps them.
          await panel.context.save();
        }
        if (choices.saveFirst && current) {
          const saved = await snapshotNotebook(
            panel,
            `before restoring ${snapshotName(s, false)}`
          );
          if (!saved) {
            return; // keep what the user would have lost
          }
        }
        await notifying(
          // Into the kernel the snapshot was taken from (its processes keep
          // that kernel's message key); started again by the server if gone.
          client.restore(s.id, {
            mode: 'replace',
            ...(choices.notebook ? { notebook: true } : {})
          }),
          `Restoring ${snapshotName(s)}…`,
          out =>
            `Kernel ${out.notebook ? 'and notebook ' : ''}restored from the snapshot in ${formatSeconds(out.total_seconds)}.`,
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

      async openNotebook(s) {
        try {
          const doc = await client.notebook(s.id);
          const name = (s.path ?? 'notebook').split('/').pop();
          const view = notebookView(
            doc,
            `${name} at ${snapshotName(s, false)} (read-only)`
          );
          app.shell.add(view, 'main', { mode: 'split-right' });
        } catch (error) {
          Notification.error(`Notebook not opened: ${reason(error)}`, {
            autoClose: 5000
          });
        }
      },

      hibernate() {
        void hibernateKernel(model.kernelId);
      },

      wake() {
        void wakeKernel(model.kernelId);
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

    async function hibernateKernel(kernelId: string | null): Promise<void> {
      if (!kernelId) {
        return;
      }
      await notifying(
        client.hibernate(kernelId),
        'Putting the kernel to disk…',
        out =>
          `Kernel hibernated: ${formatBytes(out.memory_freed_bytes)} of memory freed. It wakes when you run a cell.`,
        'Not hibernated'
      );
      await model.refresh();
    }

    async function wakeKernel(kernelId: string | null): Promise<void> {
      if (!kernelId) {
        return;
      }
      await notifying(
        client.wake(kernelId),
        'Waking the kernel…',
        out => `Kernel running again (${formatSeconds(out.total_seconds)}).`,
        'Not woken'
      );
      await model.refresh();
    }

    const panel = new SnapshotsPanel(model, actions);
    app.shell.add(panel, 'right', { rank: 650 });

    // The panel follows the current notebook and its kernel.
    // and the document it shows (for how each snapshot's notebook differs).
    let documentTimer = 0;
    const showDocument = () => {
      window.clearTimeout(documentTimer);
      documentTimer = window.setTimeout(
        () => model.setCurrentDocument(documentOf(tracker.currentWidget)),
        500
      );
    };
    const follow = () => {
      const current = tracker.currentWidget;
      void model.setContext(current?.context.path ?? null, kernelOf(current));
      showDocument();
    };
    tracker.currentChanged.connect(follow);
    tracker.widgetAdded.connect((_, nb) => {
      nb.sessionContext.kernelChanged.connect(follow);
      nb.context.pathChanged.connect(follow);
      nb.context.ready.then(() => {
        follow();
        nb.content.model?.contentChanged.connect(() => {
          if (tracker.currentWidget === nb) {
            showDocument();
          }
        });
      });
    });
    follow();

    toolbarRegistry.addFactory<NotebookPanel>(
      'Notebook',
      'ckpt-snapshot',
      nb => {
        const button = new SnapshotButton(
          progress,
          hibernation,
          () => kernelOf(nb),
          () => void snapshotNotebook(nb)
        );
        const load = () => {
          const kernelId = kernelOf(nb);
          if (kernelId) {
            void hibernation.load(kernelId);
          }
          button.update();
        };
        nb.sessionContext.kernelChanged.connect(load);
        nb.sessionContext.statusChanged.connect((_, status) => {
          if (status === 'restarting' || status === 'autorestarting') {
            setTimeout(load, 1000); // a restarted kernel is no longer on disk
          }
        });
        void nb.sessionContext.ready.then(load);
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
    app.commands.addCommand(CommandIDs.hibernate, {
      label: 'Hibernate Kernel',
      caption:
        "Put the current notebook's kernel to disk and free its memory; it wakes when you run a cell",
      isEnabled: () => {
        const kernelId = kernelOf(tracker.currentWidget);
        return !!kernelId && !hibernation.state(kernelId);
      },
      execute: () => hibernateKernel(kernelOf(tracker.currentWidget))
    });
    app.commands.addCommand(CommandIDs.wake, {
      label: 'Wake Kernel',
      caption: "Restore the current notebook's hibernated kernel now",
      isEnabled: () =>
        hibernation.state(kernelOf(tracker.currentWidget)) === 'hibernated',
      execute: () => wakeKernel(kernelOf(tracker.currentWidget))
    });
    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Show Snapshots',
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      palette.addItem({ command: CommandIDs.snapshot, category: 'Snapshots' });
      palette.addItem({ command: CommandIDs.openPanel, category: 'Snapshots' });
      palette.addItem({ command: CommandIDs.hibernate, category: 'Snapshots' });
      palette.addItem({ command: CommandIDs.wake, category: 'Snapshots' });
    }
  }
};

export default plugin;
