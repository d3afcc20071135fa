// Opens N Server-Sent-Events streams to one server page's live endpoint and holds them
// for a while, so the service's memory with many open streams can be read.
//   node scripts/open-streams.mjs BASE_URL SERVER N SECONDS
const [base, server, n = "1000", seconds = "20"] = process.argv.slice(2);
const controllers = [];
let open = 0, events = 0;
await Promise.all(Array.from({ length: Number(n) }, async () => {
  const controller = new AbortController();
  controllers.push(controller);
  try {
    const r = await fetch(`${base}/api/v1/servers/${server}/live`, { signal: controller.signal });
    if (r.status !== 200) return;
    open++;
    (async () => {
      try {
        for await (const chunk of r.body) events += (new TextDecoder().decode(chunk).match(/event: metric/g) || []).length;
      } catch {}
    })();
  } catch {}
}));
console.log(JSON.stringify({ open }));
await new Promise((r) => setTimeout(r, Number(seconds) * 1000));
console.log(JSON.stringify({ open, metric_events_received: events }));
controllers.forEach((c) => c.abort());
process.exit(0);
