// outpost dashboard: a small terminal emulator for the node page's interactive terminal.
//
// It understands what a shell and common tools (ls, top, vi, less) send to a VT100/xterm-like
// terminal: printable text with deferred wrap, CR/LF/BS/TAB, cursor movement and positioning,
// erase in line and display, insert/delete of lines and characters, scroll regions, save and
// restore of the cursor, the alternate screen, and OSC titles (ignored). Colours and other
// character attributes are parsed and dropped. The screen is drawn as text in a <pre> with a
// scrollback above it (no inline styles: the page's CSP allows only the hub's own stylesheet).
//
// termKeys(e) maps a keydown to the bytes a terminal sends for it. Nothing here does I/O.
'use strict';

class Term {
  constructor(el, rows, cols) {
    this.el = el;
    this.scrollback = [];
    this.maxScrollback = 1000;
    this.reset(rows, cols);
  }

  reset(rows, cols) {
    this.rows = rows;
    this.cols = cols;
    this.grid = this.blank(rows);
    this.r = 0; this.c = 0;
    this.wrapPending = false;
    this.top = 0; this.bottom = rows - 1;
    this.saved = [0, 0];
    this.alt = null;
    this.state = 'text';
    this.params = '';
    this.dirty();
  }

  blank(n) {
    const out = [];
    for (let i = 0; i < n; i++) out.push(new Array(this.cols).fill(' '));
    return out;
  }

  // New size: keep what fits, the cursor inside.
  resize(rows, cols) {
    if (rows === this.rows && cols === this.cols) return;
    const g = this.grid.map((row) => row.slice(0, cols).concat(new Array(Math.max(0, cols - row.length)).fill(' ')));
    while (g.length > rows) this.pushScrollback(g.shift()), this.r--;
    while (g.length < rows) g.push(new Array(cols).fill(' '));
    this.rows = rows; this.cols = cols; this.grid = g;
    this.top = 0; this.bottom = rows - 1;
    this.r = Math.max(0, Math.min(this.r, rows - 1));
    this.c = Math.min(this.c, cols - 1);
    this.dirty();
  }

  pushScrollback(row) {
    if (this.alt) return; // full-screen programs do not fill the scrollback
    this.scrollback.push(row.join('').replace(/\s+$/, ''));
    if (this.scrollback.length > this.maxScrollback) this.scrollback.shift();
  }

  scrollUp(n) {
    for (let i = 0; i < n; i++) {
      const gone = this.grid.splice(this.top, 1)[0];
      if (this.top === 0) this.pushScrollback(gone);
      this.grid.splice(this.bottom, 0, new Array(this.cols).fill(' '));
    }
  }

  scrollDown(n) {
    for (let i = 0; i < n; i++) {
      this.grid.splice(this.bottom, 1);
      this.grid.splice(this.top, 0, new Array(this.cols).fill(' '));
    }
  }

  lineFeed() {
    if (this.r === this.bottom) this.scrollUp(1);
    else if (this.r < this.rows - 1) this.r++;
  }

  put(ch) {
    if (this.wrapPending) {
      this.c = 0;
      this.lineFeed();
      this.wrapPending = false;
    }
    this.grid[this.r][this.c] = ch;
    if (this.c === this.cols - 1) this.wrapPending = true;
    else this.c++;
  }

  write(s) {
    for (const ch of s) this.feed(ch);
    this.dirty();
  }

  feed(ch) {
    const code = ch.codePointAt(0);
    switch (this.state) {
      case 'esc': return this.escape(ch);
      case 'csi':
        if (code >= 0x40 && code <= 0x7e) { this.state = 'text'; this.csi(ch, this.params); } else this.params += ch;
        return;
      case 'osc':
        if (ch === '\x07') this.state = 'text';
        else if (ch === '\x1b') this.state = 'osc-esc';
        return;
      case 'osc-esc': this.state = ch === '\\' ? 'text' : 'osc'; return;
      case 'charset': this.state = 'text'; return;
      default: break;
    }
    if (code < 0x20 || code === 0x7f) {
      switch (ch) {
        case '\r': this.c = 0; this.wrapPending = false; break;
        case '\n': case '\x0b': case '\x0c': this.lineFeed(); this.wrapPending = false; break;
        case '\b': this.c = Math.max(0, this.c - 1); this.wrapPending = false; break;
        case '\t': this.c = Math.min(this.cols - 1, (Math.floor(this.c / 8) + 1) * 8); break;
        case '\x1b': this.state = 'esc'; break;
        default: break; // BEL and the rest: nothing to draw
      }
      return;
    }
    this.put(ch);
  }

  escape(ch) {
    this.state = 'text';
    switch (ch) {
      case '[': this.state = 'csi'; this.params = ''; break;
      case ']': this.state = 'osc'; break;
      case '(': case ')': case '*': case '+': this.state = 'charset'; break;
      case '7': this.saved = [this.r, this.c]; break;
      case '8': [this.r, this.c] = this.saved; this.wrapPending = false; break;
      case 'D': this.lineFeed(); break;
      case 'E': this.c = 0; this.lineFeed(); break;
      case 'M': if (this.r === this.top) this.scrollDown(1); else if (this.r > 0) this.r--; break;
      case 'c': this.reset(this.rows, this.cols); break;
      default: break;
    }
  }

  csi(final, raw) {
    const priv = raw.startsWith('?');
    const ps = (priv ? raw.slice(1) : raw).split(';').map((x) => parseInt(x, 10));
    const p = (i, d) => (Number.isFinite(ps[i]) && ps[i] > 0 ? ps[i] : d);
    const clampR = (r) => Math.max(0, Math.min(this.rows - 1, r));
    const clampC = (c) => Math.max(0, Math.min(this.cols - 1, c));
    const row = this.grid[this.r];
    this.wrapPending = false;
    switch (final) {
      case 'A': this.r = Math.max(this.r >= this.top ? this.top : 0, this.r - p(0, 1)); break;
      case 'B': this.r = Math.min(this.r <= this.bottom ? this.bottom : this.rows - 1, this.r + p(0, 1)); break;
      case 'C': this.c = clampC(this.c + p(0, 1)); break;
      case 'D': this.c = clampC(this.c - p(0, 1)); break;
      case 'E': this.r = clampR(this.r + p(0, 1)); this.c = 0; break;
      case 'F': this.r = clampR(this.r - p(0, 1)); this.c = 0; break;
      case 'G': case '`': this.c = clampC(p(0, 1) - 1); break;
      case 'd': this.r = clampR(p(0, 1) - 1); break;
      case 'H': case 'f': this.r = clampR(p(0, 1) - 1); this.c = clampC(p(1, 1) - 1); break;
      case 'J': {
        const mode = ps[0] || 0;
        if (mode === 0) {
          row.fill(' ', this.c);
          for (let i = this.r + 1; i < this.rows; i++) this.grid[i].fill(' ');
        } else if (mode === 1) {
          row.fill(' ', 0, this.c + 1);
          for (let i = 0; i < this.r; i++) this.grid[i].fill(' ');
        } else {
          for (const g of this.grid) g.fill(' ');
          if (mode === 3) this.scrollback = [];
        }
        break;
      }
      case 'K': {
        const mode = ps[0] || 0;
        if (mode === 0) row.fill(' ', this.c);
        else if (mode === 1) row.fill(' ', 0, this.c + 1);
        else row.fill(' ');
        break;
      }
      case 'L': case 'M': {
        if (this.r < this.top || this.r > this.bottom) break;
        const n = Math.min(p(0, 1), this.bottom - this.r + 1);
        for (let i = 0; i < n; i++) {
          if (final === 'L') {
            this.grid.splice(this.bottom, 1);
            this.grid.splice(this.r, 0, new Array(this.cols).fill(' '));
          } else {
            this.grid.splice(this.r, 1);
            this.grid.splice(this.bottom, 0, new Array(this.cols).fill(' '));
          }
        }
        this.c = 0;
        break;
      }
      case 'P': {
        const n = Math.min(p(0, 1), this.cols - this.c);
        row.splice(this.c, n);
        while (row.length < this.cols) row.push(' ');
        break;
      }
      case '@': {
        const n = Math.min(p(0, 1), this.cols - this.c);
        row.splice(this.c, 0, ...new Array(n).fill(' '));
        row.length = this.cols;
        break;
      }
      case 'X': row.fill(' ', this.c, Math.min(this.cols, this.c + p(0, 1))); break;
      case 'S': this.scrollUp(p(0, 1)); break;
      case 'T': this.scrollDown(p(0, 1)); break;
      case 'r': {
        const t = p(0, 1) - 1, b = p(1, this.rows) - 1;
        if (t < b && b < this.rows) { this.top = t; this.bottom = b; this.r = 0; this.c = 0; }
        break;
      }
      case 's': this.saved = [this.r, this.c]; break;
      case 'u': [this.r, this.c] = this.saved; break;
      case 'h': case 'l':
        if (priv && [47, 1047, 1049].includes(ps[0])) this.altScreen(final === 'h');
        break;
      default: break; // SGR (m), device status, modes: nothing to draw
    }
  }

  altScreen(on) {
    if (on && !this.alt) {
      this.alt = { grid: this.grid, r: this.r, c: this.c };
      this.grid = this.blank(this.rows);
    } else if (!on && this.alt) {
      ({ grid: this.grid, r: this.r, c: this.c } = this.alt);
      this.alt = null;
    }
  }

  // What the screen shows, for tests and copy: scrollback and screen, trailing blanks cut.
  text() {
    const screen = this.grid.map((row) => row.join('').replace(/\s+$/, ''));
    while (screen.length && screen[screen.length - 1] === '') screen.pop();
    return (this.alt ? [] : this.scrollback).concat(screen).join('\n');
  }

  dirty() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    const el = this.el;
    const atBottom = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
    const lines = (this.alt ? [] : this.scrollback).slice();
    const parts = [];
    if (lines.length) parts.push(document.createTextNode(lines.join('\n') + '\n'));
    this.grid.forEach((row, i) => {
      if (i === this.r) {
        const c = Math.min(this.c, this.cols - 1);
        parts.push(document.createTextNode(row.slice(0, c).join('')));
        const cur = document.createElement('span');
        cur.className = 'cursor';
        cur.textContent = row[c];
        parts.push(cur, document.createTextNode(row.slice(c + 1).join('').replace(/\s+$/, '')));
      } else {
        parts.push(document.createTextNode(row.join('').replace(/\s+$/, '')));
      }
      if (i < this.rows - 1) parts.push(document.createTextNode('\n'));
    });
    el.replaceChildren(...parts);
    el.dataset.text = this.text();
    if (atBottom) el.scrollTop = el.scrollHeight;
  }
}

// The bytes a terminal sends for a key press; null for keys it does not send.
function termKeys(e) {
  const k = e.key;
  const named = {
    Enter: '\r', Backspace: '\x7f', Tab: '\t', Escape: '\x1b',
    ArrowUp: '\x1b[A', ArrowDown: '\x1b[B', ArrowRight: '\x1b[C', ArrowLeft: '\x1b[D',
    Home: '\x1b[H', End: '\x1b[F', Insert: '\x1b[2~', Delete: '\x1b[3~', PageUp: '\x1b[5~', PageDown: '\x1b[6~',
    F1: '\x1bOP', F2: '\x1bOQ', F3: '\x1bOR', F4: '\x1bOS',
  };
  if (named[k] !== undefined) return (e.altKey ? '\x1b' : '') + named[k];
  if (k.length !== 1 && [...k].length !== 1) return null;
  if (e.ctrlKey && !e.altKey) {
    const up = k.toUpperCase();
    const code = up.charCodeAt(0);
    if (code >= 64 && code <= 95) return String.fromCharCode(code - 64);
    if (k === ' ') return '\x00';
    if (k === '?') return '\x7f';
    return null;
  }
  if (e.metaKey) return null;
  return (e.altKey ? '\x1b' : '') + k;
}

window.Term = Term;
window.termKeys = termKeys;
