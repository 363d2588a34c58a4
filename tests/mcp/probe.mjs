// An MCP server (stdio, JSON-RPC per line) that tries what a sandboxed plugin must not manage:
// read or write outside its grant, open a socket, start processes, eat memory, hang. Each tool
// reports what happened, so the sandbox tests can check the attempt was stopped.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import readline from "node:readline";

const tools = {
  read: async ({ path }) => fs.readFileSync(path, "utf8"),
  write: async ({ path, text }) => {
    fs.writeFileSync(path, text);
    return "written";
  },
  connect: ({ port }) =>
    new Promise((resolve) => {
      let s;
      try {
        s = net.connect({ port, host: "127.0.0.1" });
      } catch (e) {
        resolve(`refused: ${e.code || e.message}`);
        return;
      }
      s.on("connect", () => {
        s.end();
        resolve("connected");
      });
      s.on("error", (e) => resolve(`refused: ${e.code || e.message}`));
    }),
  spawn: async () => {
    const r = spawnSync("/bin/true");
    return r.error ? `refused: ${r.error.code || r.error.message}` : `started, exit ${r.status}`;
  },
  fork_bomb: async () => {
    let started = 0;
    let error = "";
    for (let i = 0; i < 200; i++) {
      try {
        const c = spawn("/bin/sleep", ["30"], { stdio: "ignore", detached: false });
        await new Promise((resolve) => {
          c.once("spawn", () => {
            started++;
            resolve();
          });
          c.once("error", (e) => {
            error = e.code || e.message;
            resolve();
          });
        });
      } catch (e) {
        error = e.code || e.message;
      }
    }
    return `started ${started} of 200${error ? `; refused: ${error}` : ""}`;
  },
  eat: async ({ mb }) => {
    const keep = [];
    for (let i = 0; i < mb; i++) keep.push(Buffer.alloc(1024 * 1024, 1));
    return `holding ${keep.length} MB`;
  },
  sleep: ({ ms }) => new Promise((resolve) => setTimeout(() => resolve(`slept ${ms} ms`), ms)),
  spin: async ({ ms }) => {
    const end = Date.now() + ms;
    let n = 0;
    while (Date.now() < end) n++;
    return `spun ${n} times`;
  },
  env: async () => JSON.stringify(process.env),
  fds: async () => {
    const open = [];
    for (let fd = 3; fd < 1024; fd++) {
      try {
        const st = fs.fstatSync(fd);
        open.push(`${fd}:${st.isSocket() ? "socket" : st.isFile() ? "file" : st.isFIFO() ? "pipe" : "other"}`);
      } catch {}
    }
    return open.join(" ");
  },
};

const schema = (props, required = []) => ({ type: "object", properties: props, required });
const list = [
  { name: "read", description: "Read a file", inputSchema: schema({ path: { type: "string" } }, ["path"]), annotations: { readOnlyHint: true } },
  { name: "write", description: "Write a file", inputSchema: schema({ path: { type: "string" }, text: { type: "string" } }, ["path", "text"]) },
  { name: "connect", description: "Open a TCP connection", inputSchema: schema({ port: { type: "integer" } }, ["port"]) },
  { name: "spawn", description: "Start a process", inputSchema: schema({}) },
  { name: "fork_bomb", description: "Start many processes", inputSchema: schema({}) },
  { name: "eat", description: "Hold memory", inputSchema: schema({ mb: { type: "integer" } }, ["mb"]) },
  { name: "sleep", description: "Wait", inputSchema: schema({ ms: { type: "integer" } }, ["ms"]) },
  { name: "spin", description: "Keep a core busy", inputSchema: schema({ ms: { type: "integer" } }, ["ms"]) },
  { name: "env", description: "Show the environment", inputSchema: schema({}) },
  { name: "fds", description: "List open descriptors", inputSchema: schema({}), annotations: { destructiveHint: true } },
];

const send = (msg) => process.stdout.write(JSON.stringify({ jsonrpc: "2.0", ...msg }) + "\n");
const rl = readline.createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    return;
  }
  if (msg.id === undefined) return;
  if (msg.method === "initialize") {
    send({ id: msg.id, result: { protocolVersion: msg.params.protocolVersion, capabilities: { tools: {} }, serverInfo: { name: "probe", version: "1" } } });
  } else if (msg.method === "tools/list") {
    // Two pages, to exercise the cursor.
    const second = msg.params && msg.params.cursor === "page2";
    send({ id: msg.id, result: second ? { tools: list.slice(5) } : { tools: list.slice(0, 5), nextCursor: "page2" } });
  } else if (msg.method === "tools/call") {
    const tool = tools[msg.params.name];
    if (!tool) {
      send({ id: msg.id, error: { code: -32602, message: `no tool ${msg.params.name}` } });
      return;
    }
    try {
      const text = await tool(msg.params.arguments || {});
      send({ id: msg.id, result: { content: [{ type: "text", text }] } });
    } catch (e) {
      send({ id: msg.id, result: { content: [{ type: "text", text: `error: ${e.code || e.message}` }], isError: true } });
    }
  } else {
    send({ id: msg.id, error: { code: -32601, message: "unknown method" } });
  }
});
console.error("probe MCP server ready");
