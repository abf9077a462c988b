// Unit tests of the API client and the panel model (no DOM, no server).
// JupyterLab's packages ship ES modules: let ts-jest compile them too.
const esm = [
  '@jupyterlab',
  '@jupyter',
  '@lumino',
  '@codemirror',
  '@lezer',
  'lib0',
  'yjs',
  'y-protocols',
  'nanoid',
  'marked',
  'vscode-ws-jsonrpc'
];

module.exports = {
  testEnvironment: 'node',
  transform: {
    '^.+\\.[tj]sx?$': [
      'ts-jest',
      {
        tsconfig: {
          isolatedModules: true,
          module: 'commonjs',
          allowJs: true,
          esModuleInterop: true,
          jsx: 'react',
          target: 'ES2020',
          strict: true,
          skipLibCheck: true
        }
      }
    ]
  },
  transformIgnorePatterns: [`/node_modules/(?!(${esm.join('|')})/)`],
  moduleNameMapper: { '\\.(css|svg)$': '<rootDir>/test/empty.js' },
  testMatch: ['<rootDir>/test/**/*.spec.ts']
};
