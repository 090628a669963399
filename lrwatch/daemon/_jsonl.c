/* Optional compiled chunk decoder for lrwatch.daemon.columnar (see that module's notes).
 *
 * decode(body, n, num_keys, cat_keys, out) decodes ``n`` NDJSON prediction records joined by
 * ",\n" (the layout ChunkDecoder.decode takes). The numeric features go straight into ``out``
 * (a writable, C-contiguous buffer of n * len(num_keys) float64, NaN for missing values), the
 * rest into Python lists. It returns (preds, ids, times, labels, cats) with ids/times/labels
 * None when no record has a non-null value, or None when the chunk holds anything it does not
 * handle with certainty: any backslash escape or control character in a string, a feature key
 * outside the layout, a duplicate known key (other top-level keys are checked and ignored, as on
 * the general path, except one that looks like an optional key misnamed, "Label", "ID",
 * "Time" or "timestamp", while the record lacks that key: then it returns False, and the
 * general path, not msgspec, takes the chunk and refuses that record naming the key), an integer outside int64 (or "-0"), a
 * number JSON forbids, a float out of range or below the normal range, NaN/Infinity literals,
 * invalid UTF-8, a nested value, a blank line, a newline inside a record, a boolean or string
 * where a number is expected, an id that is not a string of 1..256 characters. The caller then
 * tries the next decoder (msgspec, then the general path), so refusing is always safe.
 *
 * Numbers: the JSON grammar is checked here. Integers are read exactly (int64). A float with at
 * most 15 significant digits and a decimal exponent within [-22, 22] is one exact integer times
 * or divided by one exact power of ten: one IEEE operation, correctly rounded (Clinger's fast
 * path). Any other float goes through PyOS_string_to_double (David Gay's correctly rounded
 * strtod, what float() uses) on a NUL-terminated copy of the token.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
#define LRW_FAST_FLOAT 1
#else
#define LRW_FAST_FLOAT 0
#endif

static const double POW10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

typedef struct {
    const char *p;
    const char *end;
} Cur;

static inline void skip_ws(Cur *c) {
    /* JSON whitespace, without the newline: every record is exactly one line */
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r')) c->p++;
}

/* A JSON number at c->p. Returns 0 on refusal, 1 for an int64 (*iv), 2 for a float (*dv). */
static int parse_number(Cur *c, long long *iv, double *dv) {
    const char *s = c->p, *e = c->end, *p = s;
    int neg = 0;
    if (p < e && *p == '-') { neg = 1; p++; }
    if (p >= e) return 0;
    uint64_t m = 0;
    int sig = 0;        /* significant digits accumulated into m (leading zeros skipped) */
    int dropped = 0;    /* significant digits beyond what m holds exactly */
    int nint = 0;       /* digits of the integer part */
    int nonzero = 0;
    if (*p == '0') {
        p++;
        nint = 1;
    } else if (*p >= '1' && *p <= '9') {
        while (p < e && *p >= '0' && *p <= '9') {
            if (sig < 19) { m = m * 10 + (uint64_t)(*p - '0'); sig++; }
            else dropped++;
            nint++;
            p++;
        }
        nonzero = 1;
    } else {
        return 0;
    }
    int isfloat = 0;
    int fracdigits = 0;  /* fraction digits accumulated into m */
    if (p < e && *p == '.') {
        isfloat = 1;
        p++;
        if (p >= e || !(*p >= '0' && *p <= '9')) return 0;
        while (p < e && *p >= '0' && *p <= '9') {
            if (*p != '0') nonzero = 1;
            if (sig == 0 && *p == '0') { fracdigits++; }
            else if (sig < 19) { m = m * 10 + (uint64_t)(*p - '0'); sig++; fracdigits++; }
            else dropped++;
            p++;
        }
    }
    long exp10 = 0;
    int bigexp = 0;
    if (p < e && (*p == 'e' || *p == 'E')) {
        isfloat = 1;
        p++;
        int eneg = 0;
        if (p < e && (*p == '+' || *p == '-')) { eneg = (*p == '-'); p++; }
        if (p >= e || !(*p >= '0' && *p <= '9')) return 0;
        while (p < e && *p >= '0' && *p <= '9') {
            if (exp10 < 100000) exp10 = exp10 * 10 + (*p - '0');
            else bigexp = 1;
            p++;
        }
        if (eneg) exp10 = -exp10;
    }
    c->p = p;
    if (!isfloat) {
        if (nint > 19 || dropped) return 0;       /* beyond int64 */
        if (neg) {
            if (m == 0) return 0;                     /* "-0": refused */
            if (m > (uint64_t)INT64_MAX + 1) return 0;
            *iv = (m == (uint64_t)INT64_MAX + 1) ? INT64_MIN : -(long long)m;
        } else {
            if (m > (uint64_t)INT64_MAX) return 0;
            *iv = (long long)m;
        }
        return 1;
    }
    double d;
    if (!nonzero) {
        d = 0.0;
    } else {
        long e10 = exp10 - fracdigits;
        if (LRW_FAST_FLOAT && !bigexp && !dropped && sig <= 15 && e10 >= -22 && e10 <= 22) {
            /* m < 10**15 < 2**53 is exact, and so is 10**|e10|: one correctly rounded op */
            d = e10 < 0 ? (double)m / POW10[-e10] : (double)m * POW10[e10];
        } else {
            char buf[80];
            Py_ssize_t len = p - s;
            if (len >= (Py_ssize_t)sizeof(buf)) return 0;
            memcpy(buf, s, (size_t)len);
            buf[len] = '\0';
            char *endp = NULL;
            d = PyOS_string_to_double(buf, &endp, NULL);
            if (d == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
            if (endp != buf + len) return 0;
            d = fabs(d);
            /* out of range, or an underflow to zero or a subnormal: refused */
            if (!isfinite(d) || d < DBL_MIN) return 0;
        }
    }
    *dv = neg ? -d : d;
    return 2;
}

/* A string at c->p (on the opening quote), without escapes or control characters. */
static int scan_string(Cur *c, const char **start, Py_ssize_t *len) {
    const char *p = c->p + 1, *e = c->end;
    const char *s = p;
    while (p < e) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"') {
            *start = s;
            *len = p - s;
            c->p = p + 1;
            return 1;
        }
        if (ch == '\\' || ch < 0x20) return 0;
        p++;
    }
    return 0;
}

static int match_lit(Cur *c, const char *lit, Py_ssize_t n) {
    if (c->end - c->p < n || memcmp(c->p, lit, (size_t)n) != 0) return 0;
    c->p += n;
    return 1;
}

/* A scalar as a Python object (int64, float, string, true, false, or null when allow_null):
 * a new reference, or NULL on refusal (no exception set). */
static PyObject *parse_scalar(Cur *c, int allow_null, int allow_str, int allow_bool) {
    if (c->p >= c->end) return NULL;
    char ch = *c->p;
    if (ch == '"') {
        if (!allow_str) return NULL;
        const char *s;
        Py_ssize_t len;
        if (!scan_string(c, &s, &len)) return NULL;
        PyObject *o = PyUnicode_DecodeUTF8(s, len, "strict");
        if (o == NULL) PyErr_Clear();
        return o;
    }
    if (ch == 'n') {
        if (!allow_null || !match_lit(c, "null", 4)) return NULL;
        Py_RETURN_NONE;
    }
    if (ch == 't') {
        if (!allow_bool || !match_lit(c, "true", 4)) return NULL;
        Py_RETURN_TRUE;
    }
    if (ch == 'f') {
        if (!allow_bool || !match_lit(c, "false", 5)) return NULL;
        Py_RETURN_FALSE;
    }
    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        long long iv;
        double dv;
        int k = parse_number(c, &iv, &dv);
        if (k == 1) return PyLong_FromLongLong(iv);
        if (k == 2) return PyFloat_FromDouble(dv);
    }
    return NULL;
}

static int valid_utf8(const char *s, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i++) {
        if ((unsigned char)s[i] >= 0x80) {
            PyObject *o = PyUnicode_DecodeUTF8(s, len, "strict");
            if (o == NULL) { PyErr_Clear(); return 0; }
            Py_DECREF(o);
            return 1;
        }
    }
    return 1;
}

/* A string without escapes whose bytes are valid UTF-8 (checked only when not ASCII). */
static int skip_string(Cur *c) {
    const char *s;
    Py_ssize_t len;
    return scan_string(c, &s, &len) && valid_utf8(s, len);
}

/* Skips one JSON value of an ignored top-level key (checked, not kept). 0: refused. */
static int skip_value(Cur *c, int depth) {
    if (c->p >= c->end || depth > 64) return 0;
    char ch = *c->p;
    if (ch == '"') return skip_string(c);
    if (ch == 'n') return match_lit(c, "null", 4);
    if (ch == 't') return match_lit(c, "true", 4);
    if (ch == 'f') return match_lit(c, "false", 5);
    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        long long iv;
        double dv;
        return parse_number(c, &iv, &dv) != 0;
    }
    if (ch == '{' || ch == '[') {
        char close = ch == '{' ? '}' : ']';
        c->p++;
        skip_ws(c);
        if (c->p < c->end && *c->p == close) { c->p++; return 1; }
        for (;;) {
            if (ch == '{') {
                if (c->p >= c->end || *c->p != '"' || !skip_string(c)) return 0;
                skip_ws(c);
                if (c->p >= c->end || *c->p != ':') return 0;
                c->p++;
                skip_ws(c);
            }
            if (!skip_value(c, depth + 1)) return 0;
            skip_ws(c);
            if (c->p >= c->end) return 0;
            if (*c->p == ',') { c->p++; skip_ws(c); continue; }
            if (*c->p == close) { c->p++; return 1; }
            return 0;
        }
    }
    return 0;
}

typedef struct {
    const char *s;
    Py_ssize_t len;
} Key;

/* Finds a key among keys[0..nk): the hinted slot first, then all of them. -1: not found. */
static inline Py_ssize_t find_key(const Key *keys, Py_ssize_t nk, Py_ssize_t hint,
                                  const char *s, Py_ssize_t len) {
    if (hint >= 0 && hint < nk && keys[hint].len == len && memcmp(keys[hint].s, s, (size_t)len) == 0)
        return hint;
    for (Py_ssize_t j = 0; j < nk; j++)
        if (keys[j].len == len && memcmp(keys[j].s, s, (size_t)len) == 0) return j;
    return -1;
}

static int load_keys(PyObject *seq, Key *out, Py_ssize_t nk) {
    for (Py_ssize_t j = 0; j < nk; j++) {
        PyObject *b = PyTuple_GET_ITEM(seq, j);
        if (!PyBytes_Check(b)) {
            PyErr_SetString(PyExc_TypeError, "keys must be bytes");
            return 0;
        }
        out[j].s = PyBytes_AS_STRING(b);
        out[j].len = PyBytes_GET_SIZE(b);
    }
    return 1;
}

enum { K_FEATURES = 1, K_PREDICTION = 2, K_ID = 4, K_TIME = 8, K_LABEL = 16 };

/* ASCII case-insensitive equality of a key with a lowercase word */
static int same_word(const char *s, Py_ssize_t len, const char *w, Py_ssize_t wl) {
    if (len != wl) return 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        char ch = s[i];
        if (ch >= 'A' && ch <= 'Z') ch = (char)(ch - 'A' + 'a');
        if (ch != w[i]) return 0;
    }
    return 1;
}

/* The optional key an ignored top-level key looks like (records.misnamed_key): "Label",
   "ID", "Time" (another case) or "timestamp" (any case); 0 for any other key. Only keys that
   are not the record's own get here, so this costs nothing on the usual records. */
static int misnamed(const char *s, Py_ssize_t len) {
    if (same_word(s, len, "label", 5)) return K_LABEL;
    if (same_word(s, len, "time", 4) || same_word(s, len, "timestamp", 9)) return K_TIME;
    if (same_word(s, len, "id", 2)) return K_ID;
    return 0;
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer body, out;
    Py_ssize_t n;
    PyObject *numkeys, *catkeys;
    if (!PyArg_ParseTuple(args, "y*nO!O!w*", &body, &n, &PyTuple_Type, &numkeys, &PyTuple_Type,
                          &catkeys, &out))
        return NULL;
    PyObject *result = NULL;
    PyObject *preds = NULL, *ids = NULL, *times = NULL, *labels = NULL, *cats = NULL;
    Key *keys = NULL;
    Py_ssize_t *stamp = NULL, *next = NULL;
    PyObject **lastcat = NULL;
    Py_ssize_t nk = PyTuple_GET_SIZE(numkeys), nc = PyTuple_GET_SIZE(catkeys), nt = nk + nc;
    if (n < 1 || out.len != (Py_ssize_t)sizeof(double) * n * nk || !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "out must be a C-contiguous buffer of n * k float64");
        goto done;
    }
    keys = PyMem_Malloc(sizeof(Key) * (size_t)(nt + 1));
    stamp = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(nt + 1));
    next = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(nt + 2));
    lastcat = PyMem_Calloc((size_t)nc + 1, sizeof(PyObject *));
    if (!keys || !stamp || !next || !lastcat) { PyErr_NoMemory(); goto done; }
    if (!load_keys(numkeys, keys, nk) || !load_keys(catkeys, keys + nk, nc)) goto done;
    for (Py_ssize_t j = 0; j < nt; j++) stamp[j] = -1;
    for (Py_ssize_t j = 0; j < nt + 2; j++) next[j] = 0;
    preds = PyList_New(n);
    ids = PyList_New(n);
    times = PyList_New(n);
    labels = PyList_New(n);
    cats = PyList_New(nc);
    if (!preds || !ids || !times || !labels || !cats) goto done;
    for (Py_ssize_t j = 0; j < nc; j++) {
        PyObject *l = PyList_New(n);
        if (!l) goto done;
        PyList_SET_ITEM(cats, j, l);
    }
    int any_id = 0, any_time = 0, any_label = 0;
    double *num = (double *)out.buf;
    const double nan = Py_NAN;
    Cur c = {(const char *)body.buf, (const char *)body.buf + body.len};

    for (Py_ssize_t i = 0; i < n; i++) {
        double *row = num + i * nk;
        for (Py_ssize_t j = 0; j < nk; j++) row[j] = nan;
        int seen = 0, misnamed_keys = 0;
        skip_ws(&c);
        if (c.p >= c.end || *c.p != '{') goto refuse;
        c.p++;
        skip_ws(&c);
        if (c.p < c.end && *c.p == '}') goto refuse;  /* {}: no features, no prediction */
        for (;;) {
            const char *ks;
            Py_ssize_t kl;
            if (c.p >= c.end || *c.p != '"' || !scan_string(&c, &ks, &kl)) goto refuse;
            skip_ws(&c);
            if (c.p >= c.end || *c.p != ':') goto refuse;
            c.p++;
            skip_ws(&c);
            if (kl == 8 && memcmp(ks, "features", 8) == 0) {
                if (seen & K_FEATURES) goto refuse;
                seen |= K_FEATURES;
                if (c.p >= c.end || *c.p != '{') goto refuse;
                c.p++;
                skip_ws(&c);
                if (c.p < c.end && *c.p == '}') {
                    c.p++;
                } else {
                    Py_ssize_t prev = nt;  /* the slot before the first key */
                    for (;;) {
                        const char *fs;
                        Py_ssize_t fl;
                        if (c.p >= c.end || *c.p != '"' || !scan_string(&c, &fs, &fl)) goto refuse;
                        skip_ws(&c);
                        if (c.p >= c.end || *c.p != ':') goto refuse;
                        c.p++;
                        skip_ws(&c);
                        Py_ssize_t j = find_key(keys, nt, next[prev], fs, fl);
                        if (j < 0 || stamp[j] == i) goto refuse;  /* unknown or duplicate */
                        stamp[j] = i;
                        next[prev] = j;
                        prev = j;
                        if (j < nk) {
                            if (c.p >= c.end) goto refuse;
                            char ch = *c.p;
                            if (ch == 'n') {
                                if (!match_lit(&c, "null", 4)) goto refuse;
                            } else if (ch == '-' || (ch >= '0' && ch <= '9')) {
                                long long iv;
                                double dv;
                                int k = parse_number(&c, &iv, &dv);
                                if (k == 1) row[j] = (double)iv;
                                else if (k == 2) row[j] = dv;
                                else goto refuse;
                            } else {
                                goto refuse;
                            }
                        } else {
                            Py_ssize_t cj = j - nk;
                            PyObject *v;
                            PyObject *last = lastcat[cj];
                            /* the same category as the previous record's: one shared str */
                            if (last != NULL && c.p < c.end && *c.p == '"') {
                                Py_ssize_t ll = PyUnicode_GET_LENGTH(last);
                                const char *lu = (const char *)PyUnicode_DATA(last);
                                if (c.end - c.p > ll + 1 && memcmp(c.p + 1, lu, (size_t)ll) == 0 &&
                                    c.p[ll + 1] == '"') {
                                    c.p += ll + 2;
                                    Py_INCREF(last);
                                    v = last;
                                    goto have_cat;
                                }
                            }
                            v = parse_scalar(&c, 1, 1, 1);
                            if (v == NULL) goto refuse;
                            if (PyUnicode_Check(v) && PyUnicode_IS_ASCII(v)) {
                                Py_XDECREF(lastcat[cj]);
                                Py_INCREF(v);
                                lastcat[cj] = v;
                            }
                        have_cat:
                            PyList_SET_ITEM(PyList_GET_ITEM(cats, cj), i, v);
                        }
                        skip_ws(&c);
                        if (c.p >= c.end) goto refuse;
                        if (*c.p == ',') { c.p++; skip_ws(&c); continue; }
                        if (*c.p == '}') { c.p++; break; }
                        goto refuse;
                    }
                }
            } else if (kl == 10 && memcmp(ks, "prediction", 10) == 0) {
                if (seen & K_PREDICTION) goto refuse;
                seen |= K_PREDICTION;
                PyObject *v = parse_scalar(&c, 0, 1, 1);
                if (v == NULL) goto refuse;
                PyList_SET_ITEM(preds, i, v);
            } else if (kl == 2 && memcmp(ks, "id", 2) == 0) {
                if (seen & K_ID) goto refuse;
                seen |= K_ID;
                if (c.p >= c.end || (*c.p != '"' && *c.p != 'n')) goto refuse;
                PyObject *v = parse_scalar(&c, 1, 1, 0);
                if (v == NULL) goto refuse;
                if (v != Py_None) {
                    Py_ssize_t L = PyUnicode_GET_LENGTH(v);
                    if (L < 1 || L > 256) { Py_DECREF(v); goto refuse; }
                    any_id = 1;
                }
                PyList_SET_ITEM(ids, i, v);
            } else if (kl == 4 && memcmp(ks, "time", 4) == 0) {
                if (seen & K_TIME) goto refuse;
                seen |= K_TIME;
                PyObject *v = parse_scalar(&c, 1, 0, 0);
                if (v == NULL) goto refuse;
                if (v != Py_None) any_time = 1;
                PyList_SET_ITEM(times, i, v);
            } else if (kl == 5 && memcmp(ks, "label", 5) == 0) {
                if (seen & K_LABEL) goto refuse;
                seen |= K_LABEL;
                PyObject *v = parse_scalar(&c, 1, 1, 1);
                if (v == NULL) goto refuse;
                if (v != Py_None) any_label = 1;
                PyList_SET_ITEM(labels, i, v);
            } else if (!valid_utf8(ks, kl) || !skip_value(&c, 0)) {
                /* other top-level keys are ignored, as on the general path (their values are
                   still checked: any doubt refuses the chunk) */
                goto refuse;
            } else {
                misnamed_keys |= misnamed(ks, kl);
            }
            skip_ws(&c);
            if (c.p >= c.end) goto refuse;
            if (*c.p == ',') { c.p++; skip_ws(&c); continue; }
            if (*c.p == '}') { c.p++; break; }
            goto refuse;
        }
        if ((seen & (K_FEATURES | K_PREDICTION)) != (K_FEATURES | K_PREDICTION)) goto refuse;
        if (misnamed_keys & ~seen) goto general;  /* the general path names the key */
        if (!(seen & K_ID)) { Py_INCREF(Py_None); PyList_SET_ITEM(ids, i, Py_None); }
        if (!(seen & K_TIME)) { Py_INCREF(Py_None); PyList_SET_ITEM(times, i, Py_None); }
        if (!(seen & K_LABEL)) { Py_INCREF(Py_None); PyList_SET_ITEM(labels, i, Py_None); }
        for (Py_ssize_t j = 0; j < nc; j++) {
            if (stamp[nk + j] != i) {
                Py_INCREF(Py_None);
                PyList_SET_ITEM(PyList_GET_ITEM(cats, j), i, Py_None);
            }
        }
        skip_ws(&c);
        if (i + 1 < n) {
            if (c.end - c.p < 2 || c.p[0] != ',' || c.p[1] != '\n') goto refuse;
            c.p += 2;
        } else if (c.p != c.end) {
            goto refuse;
        }
    }
    result = Py_BuildValue("(OOOOO)", preds, any_id ? ids : Py_None, any_time ? times : Py_None,
                           any_label ? labels : Py_None, cats);
    goto done;
general:
    /* False: the general path must take this chunk (msgspec would ignore the key too) */
    Py_INCREF(Py_False);
    result = Py_False;
    goto done;
refuse:
    if (PyErr_Occurred()) {
        /* a MemoryError is real; anything else here means "not this decoder" */
        if (PyErr_ExceptionMatches(PyExc_MemoryError)) goto done;
        PyErr_Clear();
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (lastcat) {
        for (Py_ssize_t j = 0; j < nc; j++) Py_XDECREF(lastcat[j]);
        PyMem_Free(lastcat);
    }
    PyMem_Free(keys);
    PyMem_Free(stamp);
    PyMem_Free(next);
    Py_XDECREF(preds);
    Py_XDECREF(ids);
    Py_XDECREF(times);
    Py_XDECREF(labels);
    Py_XDECREF(cats);
    PyBuffer_Release(&body);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(body, n, num_keys, cat_keys, out) -> (preds, ids, times, labels, cats) or None"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_jsonl",
                                       "Compiled chunk decoder (see lrwatch.daemon.columnar).",
                                       -1, methods};

PyMODINIT_FUNC PyInit__jsonl(void) { return PyModule_Create(&moduledef); }
