/**
 * The API client against a stand-in for the server's HTTP answers (the fetch
 * function of the connection settings): the real server is exercised by the
 * Python and browser tests; here, what the client sends and how it reads
 * answers and errors.
 */
import { ServerConnection } from '@jupyterlab/services';

import {
  CheckpointClient,
  CheckpointError,
  formatBytes,
  formatSeconds
} from '../src/api';

interface ISeen {
  url: string;
  method: string;
  body: string | null;
}

function serverAnswering(
  status: number,
  body: unknown
): { client: CheckpointClient; seen: ISeen[] } {
  const seen: ISeen[] = [];
  const fetch = async (
    input: RequestInfo | URL,
    init?: RequestInit
  ): Promise<Response> => {
    const request =
      input instanceof Request ? input : new Request(input as string, init);
    // (ServerConnection appends a cache-busting timestamp to every URL.)
    const url = request.url.replace(/[?&]\d{13}$/, '');
    seen.push({
      url,
      method: request.method,
      body: request.body ? await request.text() : null
    });
    const text =
      body === undefined
        ? ''
        : typeof body === 'string'
          ? body
          : JSON.stringify(body);
    return new Response(status === 204 ? null : text, {
      status,
      statusText: status === 200 ? 'OK' : 'Error'
    });
  };
  const settings = ServerConnection.makeSettings({
    baseUrl: 'http://localhost:8888/lab-base/',
    token: 'secret',
    fetch
  });
  return { client: new CheckpointClient(settings), seen };
}

describe('CheckpointClient', () => {
  it('starts a snapshot of a kernel with a label', async () => {
    const { client, seen } = serverAnswering(202, {
      id: '01A',
      status: 'pending'
    });
    const snap = await client.snapshot('k-1', 'epoch 3');
    expect(snap.status).toBe('pending');
    expect(seen[0].method).toBe('POST');
    expect(seen[0].url).toBe(
      'http://localhost:8888/lab-base/api/ckpt/kernels/k-1/snapshots'
    );
    expect(JSON.parse(seen[0].body!)).toEqual({ label: 'epoch 3' });
  });

  it('lists the snapshots of one notebook', async () => {
    const { client, seen } = serverAnswering(200, []);
    await client.list({ path: 'work/a b.ipynb' });
    expect(seen[0].url).toBe(
      'http://localhost:8888/lab-base/api/ckpt/snapshots?path=work%2Fa%20b.ipynb'
    );
  });

  it('restores as a new kernel in a copy of the notebook', async () => {
    const { client, seen } = serverAnswering(201, {
      kernel_id: 'k-2',
      mode: 'new',
      path: 'a-Copy1.ipynb'
    });
    const out = await client.restore('01A', { mode: 'new', copy: true });
    expect(out.path).toBe('a-Copy1.ipynb');
    expect(seen[0].url).toMatch(/\/api\/ckpt\/snapshots\/01A\/restore$/);
    expect(JSON.parse(seen[0].body!)).toEqual({ mode: 'new', copy: true });
  });

  it('deletes, and reads an empty answer', async () => {
    const { client, seen } = serverAnswering(204, undefined);
    await expect(client.remove('01A')).resolves.toBeUndefined();
    expect(seen[0].method).toBe('DELETE');
  });

  it("raises the server's reason with its status", async () => {
    const { client } = serverAnswering(409, {
      message:
        'snapshot 01A cannot be restored here: /srv/x (file) missing here'
    });
    const failure = client.restore('01A', { mode: 'replace' });
    await expect(failure).rejects.toBeInstanceOf(CheckpointError);
    await expect(failure).rejects.toMatchObject({
      status: 409,
      message: expect.stringContaining('/srv/x (file) missing here')
    });
  });

  it('says so when the answer is not JSON', async () => {
    const { client } = serverAnswering(502, '<html>Bad gateway</html>');
    await expect(client.status()).rejects.toMatchObject({
      status: 502,
      message: 'Error'
    });
  });

  it('uploads a bundle as the raw body, with or without trust', async () => {
    const { client, seen } = serverAnswering(201, { id: '01B' });
    await client.uploadBundle(new Blob(['JCKPT-BUNDLE-1\n...']), true);
    expect(seen[0].url).toMatch(/\/api\/ckpt\/bundles\?trust=true$/);
    expect(seen[0].body).toBe('JCKPT-BUNDLE-1\n...');
  });

  it('builds the bundle download address', () => {
    const { client } = serverAnswering(200, {});
    expect(client.bundleUrl('01A')).toBe(
      'http://localhost:8888/lab-base/api/ckpt/snapshots/01A/bundle'
    );
  });
});

describe('formatting', () => {
  it('formats sizes and durations', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(36 * 2 ** 20)).toBe('36 MiB');
    expect(formatBytes(null)).toBe('–');
    expect(formatSeconds(0.0531)).toBe('0.05 s');
    expect(formatSeconds(42.4)).toBe('42 s');
  });
});
