/* Eval callback that copies one named graph tensor (a stage's last l_out) into a buffer.
 *
 * llama.cpp asks the callback about every graph node (~40 per layer). A Python callback costs
 * ~1.5 us per node with the GIL held; this one costs nanoseconds and never touches Python.
 * The ggml accessors are passed in as function pointers, so nothing here links against ggml.
 * The struct layout is mirrored by mesh.llama.native.CaptureState.
 */
#include <Python.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef const char *(*get_name_fn)(const void *tensor);
typedef size_t (*nbytes_fn)(const void *tensor);
typedef void (*tensor_get_fn)(const void *tensor, void *data, size_t offset, size_t size);

typedef struct {
    get_name_fn get_name;
    nbytes_fn nbytes;
    tensor_get_fn tensor_get;
    char *dst;
    size_t capacity; /* bytes available at dst */
    size_t written;  /* bytes copied since the last reset */
    int overflow;    /* set when a copy would not fit: the caller reports it */
    char name[64];
} mesh_capture;

bool mesh_capture_eval(void *tensor, bool ask, void *user_data) {
    mesh_capture *c = (mesh_capture *) user_data;
    if (strcmp(c->get_name(tensor), c->name) != 0) {
        return !ask; /* ask: not wanted; otherwise: keep computing */
    }
    if (ask) {
        return true;
    }
    size_t n = c->nbytes(tensor);
    if (c->written + n > c->capacity) {
        c->overflow = 1;
        return true;
    }
    c->tensor_get(tensor, c->dst + c->written, 0, n);
    c->written += n;
    return true;
}

static struct PyModuleDef capture_module = {
    PyModuleDef_HEAD_INIT, "_capture",
    "Native eval callback for hidden-state capture (loaded through ctypes).", -1, NULL,
};

PyMODINIT_FUNC PyInit__capture(void) {
    return PyModule_Create(&capture_module);
}
