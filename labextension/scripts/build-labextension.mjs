// Builds the prebuilt extension against the JupyterLab installed in the active Python
// environment (its staging/package.json lists the shared packages and their versions).
// Without this, jupyter-builder tries to download @jupyterlab/core-meta for the version of
// @jupyterlab/builder, which is offline-hostile and need not match the installed lab.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';

const python = process.env.PYTHON || 'python';
const corePackage = execFileSync(
  python,
  ['-c', 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging", "package.json"))'],
  { encoding: 'utf8' }
).trim();
if (!existsSync(corePackage)) {
  console.error(`no JupyterLab core package at ${corePackage}; is jupyterlab installed in ${python}'s environment?`);
  process.exit(1);
}
const args = ['labextension', 'build', '--core-package-file', corePackage, ...process.argv.slice(2), '.'];
const result = spawnSync('jupyter', args, { stdio: 'inherit' });
process.exit(result.status ?? 1);
