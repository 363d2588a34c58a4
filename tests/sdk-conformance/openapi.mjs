// DingTalk's official OpenAPI SDK (npm `@alicloud/dingtalk`, the per-product clients) against the
// zhuli simulator, and the agent's own requests against the SDK's request models.
//
// 1. Every API the agent uses is called through the SDK's client (`protocol: 'http'`, the
//    simulator as the endpoint, the token in `x-acs-dingtalk-access-token` as the SDK puts it):
//    the SDK's request must be accepted, and the answer must fit the SDK's response model
//    exactly — every field the simulator sends is in the model with the model's JSON type (the
//    SDK's own cast is lenient: it turns numbers into strings), and the fields the agent reads
//    are in the model and in the answer.
// 2. Every request the agent sent to the simulator (AGENT_REQUESTS, a JSON file the Rust test
//    writes from `Simulator::requests`) is matched to the SDK API of its method and path and
//    checked against that API's request model: each body field is one the SDK sends in the body,
//    each query parameter one it sends in the query, with a compatible type (nested models
//    too), and every field the SDK marks required ("This parameter is required." in its type
//    declarations) is there.
//
// Prints one JSON line per check; the last line is the summary. Exits 1 on any problem.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import path from 'node:path';

const require = createRequire(import.meta.url);
const $OpenApi = require('@alicloud/openapi-client');
const $Util = require('@alicloud/tea-util');

const env = (k) => {
  const v = process.env[k];
  if (!v) {
    console.error(`${k} is not set`);
    process.exit(2);
  }
  return v;
};
const base = new URL(env('SIM_API_BASE'));
const clientId = env('SIM_CLIENT_ID');
const clientSecret = env('SIM_CLIENT_SECRET');
const robotCode = env('SIM_ROBOT_CODE');
const say = (event, extra = {}) => console.log(JSON.stringify({ event, ...extra }));
let problems = 0;
const problem = (event, extra) => {
  problems += 1;
  say(event, { ok: false, ...extra });
};

// ---- The SDK's models and APIs -------------------------------------------------------------

const MODULES = ['oauth2_1_0', 'gateway_1_0', 'robot_1_0', 'card_1_0', 'contact_1_0', 'calendar_1_0', 'todo_1_0',
  'workflow_1_0'];
const mods = Object.fromEntries(MODULES.map((m) => [m, require(`@alicloud/dingtalk/${m}`)]));
const sdkDir = path.dirname(require.resolve('@alicloud/dingtalk/package.json'));

// Required fields per model class, from the type declarations' doc comments.
const required = {};
for (const m of MODULES) {
  const dts = readFileSync(path.join(sdkDir, 'dist', m, 'client.d.ts'), 'utf8');
  const classes = dts.split(/export declare class /).slice(1);
  for (const c of classes) {
    const name = c.match(/^(\w+)/)[1];
    const body = c.split(/static names\(\)/)[0];
    const req = [];
    for (const f of body.matchAll(/\/\*\*([\s\S]*?)\*\/\s*(\w+)\?:/g)) {
      if (f[1].includes('This parameter is required.')) req.push(f[2]);
    }
    required[`${m}.${name}`] = req;
  }
}

const action = (mod, fn, pathArgs, reads) => {
  const Client = mods[mod].default;
  const src = Client.prototype[`${fn}WithOptions`].toString();
  const pathname = src.match(/pathname: `([^`]*)`/)[1];
  const method = src.match(/method: "(\w+)"/)[1];
  const name = src.match(/action: "(\w+)"/)[1];
  const wire = (where) => Object.fromEntries([...src.matchAll(new RegExp(`${where}\\["(\\w+)"\\] = request\\.(\\w+)`, 'g'))]
    .map((x) => [x[1], x[2]]));
  const pattern = new RegExp(`^${pathname.replace(/\$\{\w+\}/g, '[^/]+').replace(/\./g, '\\.')}$`);
  const up = fn[0].toUpperCase() + fn.slice(1);
  return { mod, fn, name, pathname, pattern, method, body: wire('body'), query: wire('query'), pathArgs, reads,
    Request: mods[mod][`${up}Request`], Headers: mods[mod][`${up}Headers`],
    ResponseBody: mods[mod][`${up}ResponseBody`], requestClass: `${mod}.${up}Request` };
};

// Every API the agent calls, with the answer fields it reads (`a.b[].c`; `?`: may be absent).
const API = {
  token: action('oauth2_1_0', 'getAccessToken', 0, ['accessToken', 'expireIn']),
  open: action('gateway_1_0', 'openConnection', 0, ['endpoint', 'ticket']),
  oto: action('robot_1_0', 'batchSendOTO', 0, ['flowControlledStaffIdList', 'invalidStaffIdList']),
  group: action('robot_1_0', 'orgGroupSend', 0, ['processQueryKey']),
  download: action('robot_1_0', 'robotMessageFileDownload', 0, ['downloadUrl']),
  card: action('card_1_0', 'createAndDeliver', 0, ['success', 'result.deliverResults[].success']),
  stream: action('card_1_0', 'streamingUpdate', 0, ['success']),
  cardUpdate: action('card_1_0', 'updateCard', 0, ['success']),
  search: action('contact_1_0', 'searchUser', 0, ['list']),
  events: action('calendar_1_0', 'listEvents', 2, ['events[].id', 'events[].summary', 'events[].start.dateTime',
    'events[].end.dateTime', 'events[].attendees[].displayName', 'events[].attendees[].self',
    'events[].attendees[].id', 'events[].location.displayName', 'events[].status', 'nextToken?']),
  create: action('calendar_1_0', 'createEvent', 2, ['id']),
  get: action('calendar_1_0', 'getEvent', 3, ['summary', 'description', 'start.dateTime', 'end.dateTime',
    'attendees[].id', 'attendees[].self', 'location.displayName']),
  patch: action('calendar_1_0', 'patchEvent', 3, []),
  del: action('calendar_1_0', 'deleteEvent', 3, []),
  schedule: action('calendar_1_0', 'getSchedule', 1, ['scheduleInformation[].userId', 'scheduleInformation[].error?',
    'scheduleInformation[].scheduleItems[].start.dateTime', 'scheduleInformation[].scheduleItems[].end.dateTime']),
  todo: action('todo_1_0', 'createTodoTask', 1, ['id']),
  todos: action('todo_1_0', 'queryOrgTodoTasks', 1, ['todoCards[].taskId', 'todoCards[].subject',
    'todoCards[].dueTime?', 'todoCards[].priority', 'nextToken?']),
  todoUpdate: action('todo_1_0', 'updateTodoTask', 2, ['result']),
  todoDelete: action('todo_1_0', 'deleteTodoTask', 2, []),
  pending: action('workflow_1_0', 'listTodoWorkRecords', 0, ['result.list[].instanceId', 'result.list[].title',
    'result.list[].forms[].title', 'result.list[].forms[].content', 'result.nextToken?']),
  instance: action('workflow_1_0', 'getProcessInstance', 0, ['result.title', 'result.status', 'result.result',
    'result.originatorUserId', 'result.originatorDeptName?', 'result.createTime', 'result.approverUserIds',
    'result.ccUserIds?', 'result.formComponentValues[].name', 'result.formComponentValues[].value',
    'result.tasks[].userId', 'result.tasks[].status', 'result.tasks[].result']),
};

// ---- Type checks ---------------------------------------------------------------------------

const isModel = (t) => typeof t === 'function' && typeof t.names === 'function';
const jsonType = (v) => (Array.isArray(v) ? 'array' : v === null ? 'null' : typeof v);

// Does JSON `value` fit the model type `type`? Appends "where: why" to `out`.
function fit(value, type, where, out, opts = {}) {
  if (value === null || value === undefined) return;
  if (isModel(type)) {
    if (jsonType(value) !== 'object') return out.push(`${where}: expected an object, got ${jsonType(value)}`);
    const names = type.names();
    const types = type.types();
    const byWire = Object.fromEntries(Object.entries(names).map(([prop, w]) => [w, prop]));
    for (const [k, v] of Object.entries(value)) {
      const prop = byWire[k];
      if (prop === undefined) {
        out.push(`${where}.${k}: not a field of ${type.name}`);
        continue;
      }
      fit(v, types[prop], `${where}.${k}`, out, opts);
    }
    if (opts.required) {
      for (const r of required[`${opts.mod}.${type.name}`] ?? []) {
        if (value[names[r]] === undefined || value[names[r]] === null) out.push(`${where}.${names[r]}: required by ${type.name}, missing or null`);
      }
    }
    return;
  }
  if (typeof type === 'string') {
    if (['any', 'Readable', 'Buffer'].includes(type)) return;
    if (type === 'map') return jsonType(value) === 'object' ? undefined : out.push(`${where}: expected an object`);
    if (jsonType(value) !== type) out.push(`${where}: expected ${type}, got ${jsonType(value)} ${JSON.stringify(value)}`);
    return;
  }
  if (type && type.type === 'array') {
    if (!Array.isArray(value)) return out.push(`${where}: expected an array, got ${jsonType(value)}`);
    value.forEach((v, i) => fit(v, type.itemType, `${where}[${i}]`, out, opts));
    return;
  }
  if (type && type.type === 'map') {
    if (jsonType(value) !== 'object') return out.push(`${where}: expected an object (map), got ${jsonType(value)}`);
    if (type.valueType) for (const [k, v] of Object.entries(value)) fit(v, type.valueType, `${where}.${k}`, out, opts);
    return;
  }
  out.push(`${where}: unknown model type ${JSON.stringify(type)}`);
}

// A query parameter's text against the model type (everything in a query is text).
function fitQuery(text, type) {
  if (type === 'number') return /^-?\d+(\.\d+)?$/.test(text);
  if (type === 'boolean') return text === 'true' || text === 'false';
  return type === 'string';
}

// Is `dotted` (`a.b[].c`) a field of the model, and present in the answer?
function modelHas(Model, dotted) {
  let t = Model;
  for (const part of dotted.replace(/\?$/, '').split('.')) {
    const name = part.replace('[]', '');
    if (!isModel(t)) return false;
    const prop = Object.entries(t.names()).find(([, w]) => w === name)?.[0];
    if (!prop) return false;
    t = t.types()[prop];
    if (part.endsWith('[]')) {
      if (!t || t.type !== 'array') return false;
      t = t.itemType;
    }
  }
  return true;
}
function present(value, dotted) {
  const parts = dotted.replace(/\?$/, '').split('.');
  const walk = (v, i) => {
    if (i === parts.length) return v !== undefined && v !== null;
    const name = parts[i].replace('[]', '');
    const next = v?.[name];
    if (parts[i].endsWith('[]')) return Array.isArray(next) && next.length > 0 && next.every((x) => walk(x, i + 1));
    return walk(next, i + 1);
  };
  return walk(value, 0);
}

// ---- Part 1: the SDK against the simulator -------------------------------------------------

const clients = {};
let lastRaw;
const client = (mod) => {
  if (!clients[mod]) {
    const config = new $OpenApi.Config({});
    config.protocol = 'http';
    config.endpoint = base.host;
    const c = new mods[mod].default(config);
    const original = c._spi.modifyResponse.bind(c._spi);
    c._spi.modifyResponse = async (ctx, attrs) => {
      await original(ctx, attrs);
      lastRaw = ctx.response.deserializedBody;
    };
    clients[mod] = c;
  }
  return clients[mod];
};
let token;
const seen = new Set();

async function call(key, pathArgs, request) {
  const a = API[key];
  seen.add(a.name);
  const headers = a.Headers ? new a.Headers({}) : {};
  if (token) headers.xAcsDingtalkAccessToken = token;
  lastRaw = undefined;
  let res;
  try {
    res = await client(a.mod)[`${a.fn}WithOptions`](...pathArgs, new a.Request(request), headers,
      new $Util.RuntimeOptions({}));
  } catch (e) {
    problem('sdk-call', { api: a.name, error: `${e.code ?? ''} ${e.message}`.trim() });
    return undefined;
  }
  const issues = [];
  if (a.ResponseBody && lastRaw !== undefined) fit(lastRaw, a.ResponseBody, 'body', issues);
  for (const r of a.reads) {
    if (!modelHas(a.ResponseBody, r)) issues.push(`${r}: the agent reads it, the SDK's response model has no such field`);
    else if (!r.endsWith('?') && !present(res.body, r)) issues.push(`${r}: the agent reads it, the answer lacks it`);
  }
  if (issues.length) problem('sdk-call', { api: a.name, status: res.statusCode, issues });
  else say('sdk-call', { api: a.name, ok: true, status: res.statusCode });
  return res.body;
}

const asker = env('SIM_STAFF');
const colleague = env('SIM_COLLEAGUE');
const union = `union-${asker}`;
const other = `union-${colleague}`;
const day = Date.now() + 3 * 86_400_000;
const iso = (ms) => new Date(ms).toISOString().replace(/\.\d{3}Z$/, 'Z');
const time = (ms) => ({ dateTime: iso(ms), timeZone: 'Asia/Shanghai' });

const tok = await call('token', [], { appKey: clientId, appSecret: clientSecret });
token = tok?.accessToken;
await call('open', [], { clientId, clientSecret,
  subscriptions: [{ type: 'CALLBACK', topic: '/v1.0/im/bot/messages/get' }] });
await call('oto', [], { robotCode, userIds: [asker], msgKey: 'sampleMarkdown',
  msgParam: JSON.stringify({ title: 'sdk', text: 'hello from the SDK' }) });
await call('group', [], { robotCode, openConversationId: 'cidSdkGroup', msgKey: 'sampleMarkdown',
  msgParam: JSON.stringify({ title: 'sdk', text: 'hello group' }) });
await call('download', [], { robotCode, downloadCode: env('SIM_DOWNLOAD_CODE') });
const track = `sdk-${Date.now()}`;
await call('card', [], { cardTemplateId: 'sdk-template', outTrackId: track, callbackType: 'STREAM', userIdType: 1,
  cardData: new mods.card_1_0.CreateAndDeliverRequestCardData({ cardParamMap: { content: '', flowStatus: '1' } }),
  openSpaceId: `dtv1.card//IM_ROBOT.${asker}`,
  imRobotOpenSpaceModel: new mods.card_1_0.CreateAndDeliverRequestImRobotOpenSpaceModel({ supportForward: true }),
  imRobotOpenDeliverModel: new mods.card_1_0.CreateAndDeliverRequestImRobotOpenDeliverModel({ spaceType: 'IM_ROBOT',
    robotCode }) });
await call('stream', [], { outTrackId: track, guid: 'g1', key: 'content', content: 'typing', isFull: true,
  isFinalize: true, isError: false });
await call('cardUpdate', [], { outTrackId: track,
  cardData: new mods.card_1_0.UpdateCardRequestCardData({ cardParamMap: { flowStatus: '3', content: 'typing' } }),
  cardUpdateOptions: new mods.card_1_0.UpdateCardRequestCardUpdateOptions({ updateCardDataByKey: true }) });
await call('search', [], { queryWord: env('SIM_COLLEAGUE_NAME'), offset: 0, size: 20 });
const C = mods.calendar_1_0;
const made = await call('create', [union, 'primary'], { summary: 'SDK sync', description: 'made by the SDK',
  start: new C.CreateEventRequestStart(time(day)), end: new C.CreateEventRequestEnd(time(day + 1_800_000)),
  attendees: [new C.CreateEventRequestAttendees({ id: other })],
  location: new C.CreateEventRequestLocation({ displayName: 'Room 1' }) });
await call('events', [union, 'primary'], { timeMin: iso(day - 3_600_000), timeMax: iso(day + 3_600_000),
  maxResults: 100 });
if (made?.id) {
  await call('get', [union, 'primary', made.id], {});
  await call('patch', [union, 'primary', made.id], { id: made.id, start: new C.PatchEventRequestStart(time(day + 3_600_000)),
    end: new C.PatchEventRequestEnd(time(day + 5_400_000)) });
}
await call('schedule', [union], { userIds: [union, other], startTime: iso(day - 86_400_000),
  endTime: iso(day + 86_400_000) });
if (made?.id) await call('del', [union, 'primary', made.id], { pushNotification: true });
const todo = await call('todo', [union], { operatorId: union, subject: 'SDK to-do', description: 'from the SDK',
  creatorId: union, executorIds: [other], participantIds: [union], dueTime: day, priority: 20,
  isOnlyShowExecutor: false });
await call('todos', [union], { isDone: false });
if (todo?.id) {
  await call('todoUpdate', [union, todo.id], { operatorId: union, done: true });
  await call('todoDelete', [union, todo.id], { operatorId: union });
}
await call('pending', [], { userId: env('SIM_APPROVER'), status: 0, maxResults: 20, nextToken: 0 });
await call('instance', [], { processInstanceId: env('SIM_APPROVAL') });

// ---- Part 2: the agent's requests against the SDK's request models -------------------------

// Fields the agent sends that the SDK's model lacks, each with its source: nothing else passes.
const EXTRA_FIELDS = {
  // The Stream protocol's open call takes `ua` (developerpedia's protocol page; the official
  // Stream SDKs send it); the OpenAPI SDK's OpenConnectionRequest has no such field.
  OpenConnection: ['ua'],
};

const agent = JSON.parse(readFileSync(env('AGENT_REQUESTS'), 'utf8'));
const checked = new Set();
const notInSdk = new Set();
for (const r of agent) {
  const a = Object.values(API).find((x) => x.method === r.method && x.pattern.test(r.path));
  if (!a) {
    if (r.path.startsWith('/v1.0/')) problem('agent-request', { method: r.method, path: r.path, issues: ['no SDK API has this method and path'] });
    else notInSdk.add(`${r.method} ${r.path}`);
    continue;
  }
  checked.add(a.name);
  const issues = [];
  const types = a.Request.types();
  const names = a.Request.names();
  const fields = {};
  if (r.body !== null && r.body !== undefined) {
    if (jsonType(r.body) !== 'object') issues.push(`body: expected a JSON object, got ${jsonType(r.body)}`);
    for (const [k, v] of Object.entries(r.body ?? {})) {
      const prop = a.body[k];
      if (!prop && (EXTRA_FIELDS[a.name] ?? []).includes(k)) continue;
      if (!prop) {
        issues.push(a.query[k] ? `body.${k}: the SDK sends it in the query` : `body.${k}: not a body field of ${a.name}`);
        continue;
      }
      // A field sent as null is not sent: a required one is reported missing below.
      fields[prop] = v !== null;
      fit(v, types[prop], `body.${k}`, issues, { required: true, mod: a.mod });
    }
  }
  for (const kv of r.query ? r.query.split('&') : []) {
    const [k, raw = ''] = kv.split('=');
    const text = decodeURIComponent(raw.replace(/\+/g, ' '));
    const prop = a.query[k];
    if (!prop) {
      issues.push(a.body[k] ? `query.${k}: the SDK sends it in the body` : `query.${k}: not a query parameter of ${a.name}`);
      continue;
    }
    fields[prop] = true;
    if (!fitQuery(text, types[prop])) issues.push(`query.${k}: ${JSON.stringify(text)} does not fit ${JSON.stringify(types[prop])}`);
  }
  for (const req of required[a.requestClass] ?? []) {
    if (!fields[req]) issues.push(`${names[req]}: required by ${a.Request.name}, not sent`);
  }
  if (issues.length) problem('agent-request', { api: a.name, method: r.method, path: r.path, issues });
  else say('agent-request', { api: a.name, ok: true });
}

say('summary', { problems, sdkCalls: [...seen].sort(), agentChecked: [...checked].sort(), notInSdk: [...notInSdk].sort() });
process.exit(problems ? 1 : 0);
