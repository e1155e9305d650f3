// Shared helpers of the dashboard pages.  Every string that comes from the
// relay or an instance enters the page as a text node (el(), textContent):
// no page ever assigns innerHTML, so an instance's name cannot become markup.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') node.textContent = value;
    else if (name === 'class') node.className = value;
    else if (name.startsWith('on') && typeof value === 'function') node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The relay's error body ({"error": {"message", "code"}}) as an ApiError. */
export async function errorOf(response) {
  const data = await response.json().catch(() => null);
  const error = data && typeof data.error === 'object' && data.error ? data.error : {};
  return new ApiError(response.status, error.message || `HTTP ${response.status}`, error.code);
}

/** A JSON call to the relay's API; credentials only ever in the Authorization header. */
export async function api(path, { method = 'GET', body, token, signal } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method, headers, signal, credentials: 'omit', cache: 'no-store',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

let info = null;
/** GET /api/relay, once per page: the public base URL, version, registration policy. */
export function relayInfo() {
  info ??= api('/api/relay');
  return info;
}

/**
 * Follow instances live (GET /api/instances/events, Server-Sent Events).
 *
 * EventSource reconnects by itself after a dropped connection, but gives up for
 * good on an error status (a 429, a draining node's 503, a proxy's 502): then
 * this opens it again, after a growing, jittered delay.  A hidden tab lets its
 * stream go (browsers allow six connections per host on HTTP/1.1, so idle tabs
 * must not hold them) and opens it again when shown: the first events are a
 * fresh snapshot, so nothing is missed.
 */
export function watch(ids, { onView, onDeleted, onState } = {}) {
  if (!ids.length) return { close() {} };
  const url = `/api/instances/events?ids=${ids.map(encodeURIComponent).join(',')}`;
  let source = null;
  let retry = null;
  let failures = 0;
  let closed = false;

  const open = () => {
    clearTimeout(retry);
    if (closed || source || document.hidden) return;
    source = new EventSource(url);
    source.addEventListener('instance', (e) => onView?.(JSON.parse(e.data)));
    source.addEventListener('deleted', (e) => onDeleted?.(JSON.parse(e.data).instance_id));
    source.addEventListener('open', () => {
      failures = 0;
      onState?.('live');
    });
    source.addEventListener('error', () => {
      if (source.readyState !== EventSource.CLOSED) {
        onState?.('reconnecting');
        return;
      }
      source = null;
      failures += 1;
      onState?.('reconnecting');
      const delay = Math.min(30000, 1000 * 2 ** Math.min(failures, 5)) * (0.5 + Math.random());
      retry = setTimeout(open, delay);
    });
  };
  const drop = () => {
    clearTimeout(retry);
    source?.close();
    source = null;
  };
  const visibility = () => (document.hidden ? drop() : open());
  document.addEventListener('visibilitychange', visibility);
  open();
  return {
    close() {
      closed = true;
      document.removeEventListener('visibilitychange', visibility);
      drop();
    },
  };
}

let announcer = null;
/** Say something to screen readers once (a polite live region), without moving focus. */
export function announce(text) {
  if (!announcer) {
    announcer = el('div', { class: 'sr-only', role: 'status', 'aria-live': 'polite' });
    document.body.append(announcer);
  }
  announcer.textContent = '';
  setTimeout(() => { announcer.textContent = text; }, 50);
}

export function badge(status) {
  return el('span', { class: `badge ${status}`, text: status, 'data-status': status });
}

/** "just now", "5 min ago", "3 h ago", "2 days ago". */
export function ago(seconds) {
  const diff = Math.max(0, Date.now() / 1000 - seconds);
  if (diff < 45) return 'just now';
  if (diff < 3600) return `${Math.round(diff / 60)} min ago`;
  if (diff < 86400) return `${Math.round(diff / 3600)} h ago`;
  return `${Math.round(diff / 86400)} days ago`;
}

export function lastSeen(view) {
  if (view.status === 'online') return el('span', { text: 'online now' });
  if (view.last_seen == null) return el('span', { text: 'never connected' });
  return el('span', {}, 'last seen ', el('time', {
    datetime: new Date(view.last_seen * 1000).toISOString(), 'data-ts': view.last_seen, text: ago(view.last_seen),
  }));
}

/** Keep every "… ago" on the page current. */
export function tickTimes() {
  setInterval(() => {
    for (const t of document.querySelectorAll('time[data-ts]')) t.textContent = ago(Number(t.dataset.ts));
  }, 15000);
}

export const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

// Bidirectional-text controls would make a pasted snippet read differently from what
// it does ("Trojan Source"): they are written as escapes, never as themselves.
const BIDI = /[\u202a-\u202e\u2066-\u2069]/g;
const HAS_BIDI = /[\u202a-\u202e\u2066-\u2069]/;
const escaped = (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;

/** A value as one shell word: as is when it is safe, single-quoted otherwise. */
export function sh(value) {
  const text = String(value);
  if (/^[\w@%+=:,./-]+$/.test(text)) return text;
  if (HAS_BIDI.test(text)) {
    // bash's $'…' is the quoting that can spell a character as an escape.
    return `$'${text.replace(/[\\']/g, (c) => `\\${c}`).replace(BIDI, escaped)}'`;
  }
  return `'${text.replaceAll("'", "'\\''")}'`;
}

/** A Python (and JSON) string literal. */
export const py = (value) => JSON.stringify(String(value)).replace(BIDI, escaped);

async function copyText(text, pre) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Not a secure context (plain http on a public host): select it for Ctrl+C.
    const range = document.createRange();
    range.selectNodeContents(pre);
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    return document.execCommand?.('copy') ?? false;
  }
}

/** A titled block of code with a Copy button. */
export function snippet(title, code, { name } = {}) {
  const pre = el('pre', { tabindex: 0, 'data-snippet': name, 'aria-label': title }, el('code', { text: code }));
  const state = el('span', { text: 'Copy' });
  // The button's name is "Copy: <title>"; what happened is announced, not put in its name.
  const button = el('button', { type: 'button', class: 'secondary' }, state, el('span', { class: 'sr-only', text: `: ${title}` }));
  button.addEventListener('click', async () => {
    const copied = await copyText(code, pre);
    state.textContent = copied ? 'Copied' : 'Selected: press Ctrl+C';
    announce(copied ? `Copied: ${title}` : `Selected ${title}: press Ctrl+C to copy`);
    setTimeout(() => { state.textContent = 'Copy'; }, 2000);
  });
  return el('figure', { class: 'snippet' }, el('figcaption', {}, el('span', { text: title }), button), pre);
}

/** Show an error (or clear it) in a role=alert element. */
export function showError(node, error) {
  node.hidden = !error;
  node.textContent = error ? (error.message || String(error)) : '';
}

/** The owner's agent token for an instance: in this tab's sessionStorage only, never in a URL. */
export const ownerTokens = {
  get: (id) => sessionStorage.getItem(`owner:${id}`),
  set: (id, token) => sessionStorage.setItem(`owner:${id}`, token),
  forget: (id) => sessionStorage.removeItem(`owner:${id}`),
};

/** A caller key for a private instance, kept in this tab only. */
export const callerKeys = {
  get: (id) => sessionStorage.getItem(`key:${id}`) || '',
  set: (id, key) => (key ? sessionStorage.setItem(`key:${id}`, key) : sessionStorage.removeItem(`key:${id}`)),
};

/** The agent commands an owner copies after registering or rotating the token. */
export function agentCommands(baseUrl, token) {
  const relay = sh(baseUrl);
  const secret = sh(token);
  return [
    ['Run the agent next to Ollama (or any OpenAI-compatible server: change --upstream-url)',
      `relay-agent run --relay-url ${relay} --token ${secret} \\\n  --backend openai --upstream-url http://127.0.0.1:11434/v1`, 'agent-openai'],
    ['Or try it with the built-in demo model',
      `relay-agent run --relay-url ${relay} --token ${secret} --backend demo`, 'agent-demo'],
    ['Or with Docker (image built from this repository: docker build -t instance-relay:local .)',
      `docker run -d --name relay-agent --restart unless-stopped --network host \\\n  -e AGENT_TOKEN=${secret} instance-relay:local \\\n  relay-agent run --relay-url ${relay} --backend openai --upstream-url http://127.0.0.1:11434/v1`,
      'agent-docker'],
  ];
}
