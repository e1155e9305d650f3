// A small Markdown renderer for model answers that builds DOM nodes, never
// HTML text: whatever the model writes (<script>, <img onerror>, javascript:
// links) ends up as text or is left out.  Covers what chat models emit:
// paragraphs, line breaks, headings, lists, block quotes, fenced code, rules,
// `code`, **bold**, *italic*, and [links](https://…) (http, https, mailto).

import { el } from './common.js';

const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=\S)([^*]*?\S)\*|(?<![\w])_(?=\S)([^_]*?\S)_(?![\w])|\[([^\]\n]+)\]\(([^()\s]+)\)/g;
const SAFE_LINK = /^(https?:\/\/|mailto:)/i;

// Past this many characters a paragraph is shown as plain text: an unclosed "**" makes
// inline matching quadratic, and a hostile answer must not freeze the page.
const MAX_INLINE = 20000;

export function inline(text, parent) {
  if (text.length > MAX_INLINE) {
    appendText(parent, text);
    return parent;
  }
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    appendText(parent, text.slice(last, m.index));
    if (m[1]) parent.append(el('code', { text: m[2] }));
    else if (m[3] !== undefined || m[4] !== undefined) parent.append(inline(m[3] ?? m[4], el('strong')));
    else if (m[5] !== undefined || m[6] !== undefined) parent.append(inline(m[5] ?? m[6], el('em')));
    else if (SAFE_LINK.test(m[8])) {
      parent.append(inline(m[7], el('a', { href: m[8], rel: 'noopener noreferrer nofollow', target: '_blank' })));
    } else appendText(parent, m[0]);
    last = m.index + m[0].length;
  }
  appendText(parent, text.slice(last));
  return parent;
}

function appendText(parent, text) {
  // Single newlines inside a paragraph are line breaks, as chat UIs show them.
  text.split('\n').forEach((part, i) => {
    if (i) parent.append(el('br'));
    if (part) parent.append(part);
  });
}

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)/;
// No nested quantifiers over the same characters (a heading's trailing #s are cut
// without a regex): hostile answers must not make matching take exponential time.
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*)$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
// Block quotes nest at most this deep; deeper ">" are text (recursion has a bound).
const MAX_QUOTE_DEPTH = 8;

function headingText(text) {
  let end = text.trimEnd();
  let cut = end.length;
  while (cut > 0 && end[cut - 1] === '#') cut--;
  if (cut < end.length && (cut === 0 || end[cut - 1] === ' ' || end[cut - 1] === '\t')) end = end.slice(0, cut);
  return end.trimEnd();
}

function closes(line, fence) {
  const text = line.trim();
  return text.length >= fence.length && text[0] === fence[0] && [...text].every((c) => c === fence[0]);
}

export function render(source, depth = 0) {
  const root = el('div', { class: 'answer' });
  const lines = String(source).replace(/\r\n?/g, '\n').split('\n');
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = FENCE.exec(line))) {
      const fence = m[1];
      const body = [];
      for (i++; i < lines.length && !closes(lines[i], fence); i++) body.push(lines[i]);
      i++; // the closing fence (or the end of an answer still streaming)
      root.append(el('pre', {}, el('code', { text: body.join('\n'), 'data-lang': m[2] || undefined })));
    } else if ((m = HEADING.exec(line))) {
      root.append(inline(headingText(m[2]), el(`h${Math.min(6, m[1].length + 2)}`)));
      i++;
    } else if (RULE.test(line)) {
      root.append(el('hr'));
      i++;
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const list = el(ordered ? 'ol' : 'ul');
      if (ordered) {
        const start = Number(NUMBERED.exec(line)[1]);
        if (start !== 1) list.setAttribute('start', String(start));
      }
      while (i < lines.length && !RULE.test(lines[i]) && (m = pattern.exec(lines[i]))) {
        list.append(inline(ordered ? m[2] : m[1], el('li')));
        i++;
      }
      root.append(list);
    } else if (depth < MAX_QUOTE_DEPTH && QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
      root.append(el('blockquote', {}, ...render(body.join('\n'), depth + 1).childNodes));
    } else {
      const body = [];
      // The first line is this paragraph's whatever it looks like: every line is consumed once.
      do {
        body.push(lines[i]);
        i++;
      } while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
               && !BULLET.test(lines[i]) && !NUMBERED.test(lines[i]) && !QUOTE.test(lines[i]));
      root.append(inline(body.join('\n'), el('p')));
    }
  }
  return root;
}
