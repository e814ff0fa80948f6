// Validates Prometheus Operator objects (ServiceMonitor, PrometheusRule) against the
// schemas of their CRDs, which kubernetes-validate does not ship. The schemas come
// from @kubernetes-models/prometheus-operator (pinned in package-lock.json, installed
// by `make lint` into .tools/node). Reads a JSON array of objects on stdin; prints one
// line per object; exits 1 if any is invalid.
// Usage: node validate_crds.mjs NODE_MODULES_DIR < objects.json
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
if (!modules) {
  console.error("usage: node validate_crds.mjs NODE_MODULES_DIR < objects.json");
  process.exit(2);
}
const models = join(modules, "@kubernetes-models", "prometheus-operator", "monitoring.coreos.com", "v1");
const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const obj of objects) {
  const where = `${obj.kind}/${obj.metadata?.name}`;
  if (obj.apiVersion !== "monitoring.coreos.com/v1" || !["ServiceMonitor", "PrometheusRule"].includes(obj.kind)) {
    console.log(`ERROR ${where}: not a monitoring.coreos.com/v1 ServiceMonitor or PrometheusRule`);
    failed++;
    continue;
  }
  const model = await import(pathToFileURL(join(models, `${obj.kind}.js`)).href);
  try {
    new model[obj.kind](obj).validate();
    console.log(`INFO ${where} passed against the monitoring.coreos.com/v1 CRD schema`);
  } catch (err) {
    console.log(`ERROR ${where} did not validate against the CRD schema: ${err.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
