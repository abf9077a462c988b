import { LabIcon } from '@jupyterlab/ui-components';

/** A camera shutter: the Snapshot button and the panel's tab. */
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M9 3 7.2 5H4a2 2 0 0 0-2 2v12a2 2 0 0 0 2 2h16a2 2 0 0 0 2-2V7a2 2 0 0 0-2-2h-3.2L15 3H9zm3 5a5 5 0 1 1 0 10 5 5 0 0 1 0-10zm0 2a3 3 0 1 0 0 6 3 3 0 0 0 0-6z"/>
  </g>
</svg>`;

export const snapshotIcon = new LabIcon({
  name: 'jupyter-ckpt:snapshot',
  svgstr: svg
});
