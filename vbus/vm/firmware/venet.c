/* vbus vm firmware: venet (filled in below). */
#include "fw.h"
