// A form generated from a JSON schema: the steering spec's, as GET /v1/steering/schema publishes it. Nothing
// here knows a steering method: a family added to the spec later gets its controls from its schema alone.
//
//   objects          a fieldset; an optional one has a checkbox that adds or removes it
//   numbers          a number box; with both bounds also a slider (logarithmic over a wide positive range)
//   enums            a select          booleans  a checkbox          strings   a text box
//   const            a checkbox that sets the constant (e.g. a preset)
//   unions (anyOf)   a select of the alternatives, then the chosen one's control
//   arrays           of numbers/strings: a comma-separated box; of objects: a list of fieldsets, add/remove
//   maps             key/value rows, add/remove; a map keyed "<layer>.<head>" is a layer x head grid when the
//                    model's shape is known
//
// The value (a JSON object) is the one source of truth. A leaf edit updates it and calls onChange without
// redrawing (focus stays); a structural edit (adding a family, an item, switching a union) redraws. Every
// control carries data-path="family.field..." so it can be found; fields left unset stay out of the value.

const GRID_KEY = /<layer>\.<head>/;
const MAX_GRID_CELLS = 4096;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

export class SpecForm {
  // root: the element to draw into; schema: the spec's JSON schema; options.model: the model's shape
  // ({num_layers, num_heads, unsupported: {family: reason}}); options.onChange(value) after every edit.
  constructor(root, schema, { model = {}, onChange = () => {} } = {}) {
    Object.assign(this, { root, schema, model, onChange, value: {} });
    this.defs = schema.$defs || schema.definitions || {};
  }

  // Replace the whole value (e.g. from the raw JSON editor or a loaded profile) and redraw.
  setValue(value) {
    this.value = value && typeof value === "object" && !Array.isArray(value) ? structuredClone(value) : {};
    this.render();
  }

  families() {
    return Object.entries(this.schema.properties || {}).filter(([, s]) => !("const" in this.resolve(s)));
  }

  render() {
    this.root.replaceChildren();
    for (const [name, s] of this.families()) {
      const reason = (this.model.unsupported || {})[name];
      const node = this.field(s, [name], name, false, reason);
      node.dataset.family = name;
      this.root.append(node);
    }
  }

  resolve(s) {
    while (s && s.$ref) s = this.defs[s.$ref.split("/").pop()] || {};
    return s || {};
  }

  // The alternatives of a schema other than null, and whether null (unset) is one of them.
  variants(s) {
    s = this.resolve(s);
    if (!s.anyOf && !s.oneOf) return { list: [s], nullable: false };
    const all = (s.anyOf || s.oneOf).map((v) => this.resolve(v));
    const list = all.filter((v) => v.type !== "null");
    return { list, nullable: list.length < all.length };
  }

  get(path) {
    return path.reduce((o, k) => (o == null ? undefined : o[k]), this.value);
  }

  set(path, v, redraw = false) {
    let o = this.value;
    for (const k of path.slice(0, -1)) o = o[k] ?? (o[k] = typeof k === "number" ? [] : {});
    const last = path[path.length - 1];
    if (v === undefined) {
      if (Array.isArray(o)) o.splice(last, 1);
      else delete o[last];
    } else o[last] = v;
    if (redraw) this.render();
    this.onChange(this.value);
  }

  // A first value that the schema accepts: the default, else the constant, first choice, required fields...
  initial(s) {
    s = this.resolve(s);
    if (s.default !== undefined && s.default !== null) return structuredClone(s.default);
    if ("const" in s) return s.const;
    if (s.enum) return s.enum[0];
    if (s.anyOf || s.oneOf) return this.initial(this.variants(s).list[0]);
    if (s.type === "object") {
      const o = {};
      for (const r of s.required || []) o[r] = this.initial(s.properties[r]);
      return o;
    }
    if (s.type === "array") return Array.from({ length: s.minItems || 0 }, () => this.initial(s.items || {}));
    if (s.type === "number" || s.type === "integer") {
      const { lo, hi } = bounds(s);
      if (lo !== undefined && hi === undefined) return s.exclusiveMinimum !== undefined ? lo + 1 : lo;
      return Math.min(hi ?? 1, Math.max(lo ?? 1, 1));
    }
    if (s.type === "boolean") return false;
    return "";
  }

  matches(s, v) {
    s = this.resolve(s);
    if ("const" in s) return v === s.const;
    if (s.enum) return s.enum.includes(v);
    if (s.type === "array") return Array.isArray(v);
    if (s.type === "object") return v !== null && typeof v === "object" && !Array.isArray(v);
    if (s.type === "number" || s.type === "integer") return typeof v === "number";
    if (s.type === "boolean") return typeof v === "boolean";
    return typeof v === "string";
  }

  // One field: a fieldset for an object, a labelled row for anything else. `reason`: why it cannot be used.
  field(schema, path, label, required, reason) {
    const { list, nullable } = this.variants(schema);
    const outer = this.resolve(schema);
    const description = outer.description || list[0].description || "";
    const value = this.get(path);
    if (list.length === 1 && list[0].type === "object" && list[0].properties) {
      return this.objectField(list[0], path, label, description, !required || nullable, reason);
    }
    const row = el("div", { class: "row", title: description });
    row.append(el("label", { text: label, title: description }));
    const slot = el("span", { class: "control" });
    row.append(slot);
    const optional = !required || nullable;
    if (list.length > 1 && !list.every((v) => "const" in v)) {
      slot.append(this.unionControl(list, outer, path, value, optional));
    } else {
      slot.append(this.leaf(list.length > 1 ? { enum: list.map((v) => v.const) } : list[0], outer, path, value,
                            optional));
    }
    if (optional && value !== undefined) {
      const clear = el("button", { type: "button", class: "clear", title: "unset", "data-path": path.join("."),
                                   "data-action": "clear", text: "×" });
      clear.addEventListener("click", () => this.set(path, undefined, true));
      row.append(clear);
    }
    return row;
  }

  objectField(s, path, label, description, optional, reason) {
    const value = this.get(path);
    const box = el("fieldset", { class: value === undefined ? "off" : "on", title: description });
    const legend = el("legend");
    if (optional) {
      const toggle = el("input", { type: "checkbox", "data-path": path.join("."), "data-action": "toggle",
                                   "aria-label": `use ${label}` });
      toggle.checked = value !== undefined;
      toggle.disabled = Boolean(reason) && value === undefined;
      toggle.addEventListener("change", () => this.set(path, toggle.checked ? this.initial(s) : undefined, true));
      legend.append(toggle, " ");
    }
    legend.append(el("span", { text: label }));
    if (reason) legend.append(el("small", { class: "unsupported", text: ` unavailable: ${reason}` }));
    box.append(legend);
    if (description) box.append(el("p", { class: "hint", text: description }));
    if (value !== undefined) {
      const required = new Set(s.required || []);
      for (const [name, sub] of Object.entries(s.properties)) {
        box.append(this.field(sub, [...path, name], name, required.has(name)));
      }
    }
    return box;
  }

  unionControl(list, outer, path, value, optional) {
    const wrap = el("span", { class: "union" });
    const pick = el("select", { "data-path": path.join("."), "data-action": "variant" });
    let current = list.findIndex((v) => this.matches(v, value ?? outer.default));
    if (optional && value === undefined) pick.append(el("option", { value: "", text: "(unset)" }));
    list.forEach((v, i) => pick.append(el("option", { value: String(i), text: variantLabel(v) })));
    pick.value = value === undefined && optional ? "" : String(Math.max(current, 0));
    pick.addEventListener("change", () => {
      this.set(path, pick.value === "" ? undefined : this.initial(list[Number(pick.value)]), true);
    });
    wrap.append(pick);
    if (value !== undefined && current >= 0 && !("const" in list[current])) {
      const v = list[current];
      if (v.type === "object" && v.properties) {
        const required = new Set(v.properties ? v.required || [] : []);
        for (const [name, sub] of Object.entries(v.properties)) {
          wrap.append(this.field(sub, [...path, name], name, required.has(name)));
        }
      } else if (!v.enum || v.enum.length > 1) wrap.append(this.leaf(v, {}, path, value, false));
    }
    return wrap;
  }

  leaf(s, outer, path, value, optional) {
    const dataPath = path.join(".");
    const shown = value ?? outer.default ?? s.default;
    if ("const" in s) {
      const box = el("input", { type: "checkbox", "data-path": dataPath });
      box.checked = value === s.const;
      box.addEventListener("change", () => this.set(path, box.checked ? s.const : undefined, true));
      return el("span", {}, box, ` ${JSON.stringify(s.const)}`);
    }
    if (s.enum) {
      const select = el("select", { "data-path": dataPath });
      if (optional) select.append(el("option", { value: "", text: "(default)" }));
      for (const option of s.enum) select.append(el("option", { value: JSON.stringify(option), text: String(option) }));
      select.value = value === undefined ? (optional ? "" : JSON.stringify(shown)) : JSON.stringify(value);
      select.addEventListener("change", () => this.set(path, select.value === "" ? undefined : JSON.parse(select.value)));
      return select;
    }
    if (s.type === "boolean") {
      const box = el("input", { type: "checkbox", "data-path": dataPath });
      box.checked = Boolean(shown);
      box.addEventListener("change", () => this.set(path, box.checked, true));
      return box;
    }
    if (s.type === "number" || s.type === "integer") return this.numberControl(s, path, value, shown, optional);
    if (s.type === "array") return this.arrayControl(s, path, value);
    if (s.type === "object") return this.mapControl(s, path, value || {});
    const text = el("input", { type: "text", "data-path": dataPath, maxlength: s.maxLength, pattern: s.pattern,
                               placeholder: shown ?? "" });
    text.value = value ?? "";
    text.addEventListener("change", () => this.set(path, text.value === "" && optional ? undefined : text.value));
    return text;
  }

  numberControl(s, path, value, shown, optional, onSet) {
    const set = onSet || ((v) => this.set(path, v));
    const { lo, hi } = bounds(s);
    const integer = s.type === "integer";
    const box = el("input", { type: "number", "data-path": path.join("."), min: lo, max: hi, step: integer ? 1 : "any",
                              placeholder: shown ?? "" });
    box.value = value ?? "";
    const wrap = el("span", { class: "number" });
    let slider = null;
    if (lo !== undefined && hi !== undefined) {
      const scale = sliderScale(lo, hi, integer);
      slider = el("input", { type: "range", "data-path": path.join("."), "data-role": "slider", min: scale.min,
                             max: scale.max, step: scale.step });
      if (shown !== undefined && shown !== null) slider.value = String(scale.to(shown));
      slider.addEventListener("input", () => {
        let v = scale.from(Number(slider.value));
        v = integer ? Math.round(v) : Number(v.toPrecision(4));
        box.value = String(v);
        set(v);
      });
      wrap.append(slider);
    }
    box.addEventListener("change", () => {
      if (box.value === "") return set(optional ? undefined : shown);
      const v = Number(box.value);
      if (slider) slider.value = String(sliderScale(lo, hi, integer).to(v));
      set(v);
    });
    wrap.append(box);
    return wrap;
  }

  arrayControl(s, path, value) {
    const items = this.resolve(s.items || {});
    if (items.type === "object") {
      const list = el("div", { class: "list" });
      (value || []).forEach((_, i) => {
        const box = this.objectField(items, [...path, i], `${path[path.length - 1]}[${i}]`, "", false);
        const remove = el("button", { type: "button", "data-path": `${path.join(".")}.${i}`, "data-action": "remove",
                                      text: "remove" });
        remove.addEventListener("click", () => this.set([...path, i], undefined, true));
        box.append(remove);
        list.append(box);
      });
      const add = el("button", { type: "button", "data-path": path.join("."), "data-action": "add", text: "+ add" });
      add.addEventListener("click", () => this.set(path, [...(value || []), this.initial(items)], true));
      list.append(add);
      return list;
    }
    const numeric = items.type === "integer" || items.type === "number";
    const text = el("input", { type: "text", "data-path": path.join("."), placeholder: "comma-separated" });
    text.value = (value || []).join(", ");
    text.addEventListener("change", () => {
      const parts = text.value.split(",").map((p) => p.trim()).filter((p) => p !== "");
      const parsed = numeric ? parts.map(Number) : parts;
      text.classList.toggle("invalid", numeric && parsed.some((n) => !Number.isFinite(n)));
      this.set(path, parsed);
    });
    return text;
  }

  mapControl(s, path, value) {
    const valueSchema = this.resolve(s.additionalProperties || {});
    const { num_layers: layers = 0, num_heads: heads = 0 } = this.model;
    const description = s.description || "";
    if (GRID_KEY.test(description) && layers > 0 && heads > 0 && layers * heads <= MAX_GRID_CELLS) {
      return this.gridControl(valueSchema, path, value, layers, heads);
    }
    const table = el("div", { class: "map" });
    for (const [key, v] of Object.entries(value)) {
      const keyBox = el("input", { type: "text", class: "key", value: key, "data-path": `${path.join(".")}`,
                                   "data-role": "key" });
      keyBox.addEventListener("change", () => {
        const next = {};
        for (const [k, old] of Object.entries(this.get(path) || {})) next[k === key ? keyBox.value : k] = old;
        this.set(path, next, true);
      });
      const control = this.numberOrText(valueSchema, [...path, key], v);
      const remove = el("button", { type: "button", text: "×", "data-action": "remove" });
      remove.addEventListener("click", () => this.set([...path, key], undefined, true));
      table.append(el("div", { class: "map-row" }, keyBox, control, remove));
    }
    const newKey = el("input", { type: "text", class: "key", placeholder: "new key", "data-path": path.join("."),
                                 "data-role": "new-key" });
    const add = el("button", { type: "button", "data-path": path.join("."), "data-action": "add", text: "+ add" });
    add.addEventListener("click", () => {
      if (newKey.value !== "") this.set(path, { ...(this.get(path) || {}), [newKey.value]: this.initial(valueSchema) }, true);
    });
    table.append(el("div", { class: "map-row" }, newKey, add));
    return table;
  }

  numberOrText(s, path, v) {
    if (s.type === "number" || s.type === "integer") return this.numberControl(s, path, v, v, false);
    return this.leaf(s, {}, path, v, false);
  }

  gridControl(valueSchema, path, value, layers, heads) {
    const table = el("table", { class: "grid", "data-path": path.join(".") });
    const head = el("tr", {}, el("th", { text: "layer \\ head" }));
    for (let h = 0; h < heads; h++) head.append(el("th", { text: String(h) }));
    table.append(head);
    const { lo, hi } = bounds(valueSchema);
    for (let l = 0; l < layers; l++) {
      const row = el("tr", {}, el("th", { text: String(l) }));
      for (let h = 0; h < heads; h++) {
        const key = `${l}.${h}`;
        const cell = el("input", { type: "number", step: "any", min: lo, max: hi, "data-path": `${path.join(".")}.${key}`,
                                   title: `layer ${l}, head ${h}` });
        cell.value = value[key] ?? "";
        cell.className = shade(value[key]);
        cell.addEventListener("change", () => {
          const next = { ...(this.get(path) || {}) };
          if (cell.value === "") delete next[key];
          else next[key] = Number(cell.value);
          cell.className = shade(next[key]);
          this.set(path, next);
        });
        row.append(el("td", {}, cell));
      }
      table.append(row);
    }
    return el("div", { class: "grid-wrap" }, table);
  }
}

function bounds(s) {
  const lo = s.minimum ?? s.exclusiveMinimum;
  const hi = s.maximum ?? s.exclusiveMaximum;
  return { lo, hi };
}

// A slider's scale: linear over a modest range, logarithmic (base 10) over a wide positive one.
function sliderScale(lo, hi, integer) {
  const floor = Math.max(lo, lo === 0 ? 1e-3 : lo);
  if (lo >= 0 && hi / Math.max(floor, 1e-3) > 1e4) {
    const min = Math.log10(Math.max(floor, 1e-3));
    const max = Math.log10(Math.min(hi, floor * 1e6));
    return { min, max, step: (max - min) / 600, to: (v) => Math.log10(Math.max(v, 1e-12)), from: (x) => 10 ** x };
  }
  const step = integer ? 1 : (hi - lo) / 400;
  return { min: lo, max: hi, step, to: (v) => v, from: (x) => x };
}

function shade(v) {
  if (v === undefined || v === null || v === "") return "";
  return v < 1 ? "damp" : v > 1 ? "boost" : "same";
}

function variantLabel(v) {
  if ("const" in v) return JSON.stringify(v.const);
  if (v.enum) return v.enum.join(" | ");
  if (v.title) return v.title;
  if (v.type === "array") return `list of ${(v.items && v.items.type) || "items"}`;
  return v.type || "value";
}
