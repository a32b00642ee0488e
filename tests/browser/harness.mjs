// What the browser suites share: the askstream binary (built unless ASKSTREAM_BIN names
// one), servers started from it on free ports, and Debian's headless Chromium.

import { execFileSync, spawn } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** The binary under test: ASKSTREAM_BIN, or a debug build made now (a no-op when fresh). */
export function serverBinary() {
  if (process.env.ASKSTREAM_BIN) return process.env.ASKSTREAM_BIN;
  execFileSync('cargo', ['build', '--quiet', '--bin', 'askstream'], { cwd: ROOT, stdio: 'inherit' });
  return join(ROOT, 'target/debug/askstream');
}

/** Starts the binary on a free port; resolves once it logs the address it listens on. */
export function startServer(binary, flags) {
  const args = ['--listen', '127.0.0.1:0', '--shutdown-grace-secs', '1', ...flags];
  const child = spawn(binary, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' },
  });
  let log = '';
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const kill = () => child.kill('SIGKILL');
  process.once('exit', kill);
  return new Promise((resolve, reject) => {
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (data) => {
      log += data;
      const m = /listening \((TLS)?.*addr=(\S+)/.exec(log);
      if (m) {
        resolve({
          url: `${m[1] ? 'https' : 'http'}://${m[2]}`,
          log: () => log,
          exitCode: () => child.exitCode ?? child.signalCode,
          async stop() {
            process.removeListener('exit', kill);
            child.kill('SIGTERM');
            await exited;
          },
        });
      }
    });
    child.once('error', reject);
    exited.then((code) => reject(new Error(`askstream exited (${code}) before listening:\n${log}`)));
  });
}

/** Headless Chromium with nothing running in the background, plus `extraArgs`. */
export function launchBrowser(extraArgs = []) {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
      ...extraArgs,
    ],
  });
}
