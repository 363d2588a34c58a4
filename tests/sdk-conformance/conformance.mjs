// DingTalk's official Stream SDK (npm `dingtalk-stream`), pointed at the zhuli simulator.
// The SDK has no setting for its API base, so every axios request to api.dingtalk.com is
// rewritten to SIM_API_BASE. Each step prints one JSON line for the Rust test to read.
import axios from 'axios';
import { DWClient, TOPIC_ROBOT } from 'dingtalk-stream';

const base = process.env.SIM_API_BASE;
if (!base) {
  console.error('SIM_API_BASE is not set');
  process.exit(2);
}
const say = (event, extra = {}) => console.log(JSON.stringify({ event, ...extra }));

axios.interceptors.request.use((config) => {
  config.url = config.url.replace('https://api.dingtalk.com', base);
  return config;
});

const client = new DWClient({
  clientId: process.env.SIM_CLIENT_ID,
  clientSecret: process.env.SIM_CLIENT_SECRET,
});

client.registerCallbackListener(TOPIC_ROBOT, async (res) => {
  const messageId = res.headers.messageId;
  const msg = JSON.parse(res.data);
  say('robot', { messageId, msgId: msg.msgId, text: msg.text?.content ?? null });
  // ACK the callback so the gateway does not push it again.
  client.socketCallBackResponse(messageId, null);
  // Answer through the session webhook, as the SDK's example does.
  const r = await axios.post(msg.sessionWebhook, {
    msgtype: 'text',
    text: { content: `sdk echo: ${msg.text?.content ?? ''}` },
  });
  say('replied', { errcode: r.data.errcode });
});

await client.connect();
say('connected', { connected: client.connected });
setInterval(() => {}, 1 << 30);
