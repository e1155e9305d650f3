// Server-Sent Events read from a fetch() body (EventSource cannot POST).
// The WHATWG event-stream rules, line by line: a line ends with CRLF, LF or
// CR (a CR at the end of a chunk may be the first half of a CRLF, so it waits
// for the next chunk); an empty line dispatches the event; "data" lines join
// with \n; lines starting with ":" are comments.

const LINE_END = /\r\n|\n|\r/g;

export async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const event = new Event();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let start = 0;
      LINE_END.lastIndex = 0;
      for (let m = LINE_END.exec(buffer); m; m = LINE_END.exec(buffer)) {
        if (m[0] === '\r' && m.index === buffer.length - 1) break; // maybe half a CRLF
        const dispatched = event.line(buffer.slice(start, m.index));
        start = m.index + m[0].length;
        if (dispatched) yield dispatched;
      }
      buffer = buffer.slice(start);
    }
  } finally {
    // Leaving early (a break, an error, Stop) lets go of the response too.
    await reader.cancel().catch(() => {});
  }
}

class Event {
  constructor() {
    this.reset();
  }

  reset() {
    this.type = 'message';
    this.data = [];
  }

  /** One line of the stream; the event it completes, if it was the blank line after one. */
  line(text) {
    if (text === '') {
      const out = this.data.length ? { event: this.type, data: this.data.join('\n') } : null;
      this.reset();
      return out;
    }
    if (text.startsWith(':')) return null;
    const colon = text.indexOf(':');
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? '' : text.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.type = value;
    return null;
  }
}

/** The events of a whole stream given as text (for tests and the console). */
export function parseAll(text) {
  const event = new Event();
  const out = [];
  for (const line of `${text}`.split(/\r\n|\n|\r/)) {
    const dispatched = event.line(line);
    if (dispatched) out.push(dispatched);
  }
  return out;
}
