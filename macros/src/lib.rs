//! `#[remote]`: registers a function so clusterman can run it on other processes.
//! See the `clusterman` crate for documentation. (`#[call_path]` is clusterman's own.)

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::{FnArg, ItemFn, PathArguments, ReturnType, Type, parse_macro_input, spanned::Spanned};

/// Makes a function callable on other processes of the cluster.
///
/// ```ignore
/// #[remote]
/// fn simulate(seed: u64, steps: u32) -> f64 { /* ... */ }
/// // cluster.remote_call(pid, simulate, (7, 1000))?.fetch()?  -> f64
/// // simulate::call(7, 1000)                                   -> f64, here
/// ```
///
/// The function's name becomes a unit struct implementing `clusterman::RemoteFn` (arguments
/// as a tuple, typed result), and the body becomes its associated function `call`. A
/// function returning `Result<T, E>` (any path ending in `Result`, `E: Display`) yields `T`
/// remotely; an `Err` arrives as a `RemoteError`. Generic, async and method functions are
/// not supported: a remote call needs one concrete signature known to every process.
#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(proc_macro2::TokenStream::from(attr).span(), "#[remote] takes no arguments")
            .to_compile_error()
            .into();
    }
    let func = parse_macro_input!(item as ItemFn);
    match expand(func) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &func.sig;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(sig.generics.span(), "#[remote] functions cannot be generic: every process must agree on one concrete signature"));
    }
    if let Some(a) = &sig.asyncness {
        return Err(syn::Error::new(a.span(), "#[remote] functions cannot be async"));
    }
    let mut arg_types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Typed(pat) => arg_types.push((*pat.ty).clone()),
            FnArg::Receiver(r) => return Err(syn::Error::new(r.span(), "#[remote] functions cannot take self")),
        }
    }
    let name = &sig.ident;
    let vis = &func.vis;
    let attrs = &func.attrs;
    let block = &func.block;
    let inputs = &sig.inputs;
    let output = &sig.output;
    let arg_names: Vec<_> = (0..arg_types.len()).map(|i| format_ident!("__arg{i}")).collect();
    let (out_type, fallible) = match output {
        ReturnType::Default => (syn::parse_quote!(()), false),
        ReturnType::Type(_, ty) => match result_ok_type(ty) {
            Some(ok) => (ok, true),
            None => ((**ty).clone(), false),
        },
    };
    let invoke = if fallible {
        quote! { #name::call(#(#arg_names),*).map_err(|e| ::std::string::ToString::to_string(&e)) }
    } else {
        quote! { ::core::result::Result::Ok(#name::call(#(#arg_names),*)) }
    };
    let signature = quote!(fn(#(#arg_types),*) #output).to_string();
    let doc = format!("Remote function `{name}`: pass it to `Cluster::remote_call` and friends; run it here with [`{name}::call`].");
    Ok(quote! {
        #[doc = #doc]
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug)]
        #vis struct #name;

        impl #name {
            #(#attrs)*
            #vis fn call(#inputs) #output #block
        }

        impl ::clusterman::RemoteFn for #name {
            type Args = (#(#arg_types,)*);
            type Output = #out_type;
            const NAME: &'static str = ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name));
            fn invoke(args: Self::Args) -> ::core::result::Result<Self::Output, ::std::string::String> {
                let (#(#arg_names,)*) = args;
                #invoke
            }
        }

        const _: () = {
            #[::clusterman::__private::linkme::distributed_slice(::clusterman::__private::REMOTE_FUNCTIONS)]
            #[linkme(crate = ::clusterman::__private::linkme)]
            static ENTRY: ::clusterman::__private::RemoteEntry = ::clusterman::__private::entry::<#name>(#signature);
        };
    })
}

/// `T` of a return type written `...Result<T, ...>`.
fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else { return None };
    match args.args.first()? {
        syn::GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    }
}

/// Internal to clusterman: puts a function that every served call runs through into one
/// section of the executable (on Linux), so that those functions share a few pages. Among
/// a thousand worker processes on two cores each call finds the TLB cold, and pays per page
/// it runs through more than per instruction. Not for generic functions: an instance for
/// each remote function would land there, cold ones among the hot (see [`remote_path`]).
/// Nor with `#[inline]` on a function the compiler does not inline anyway: each codegen unit
/// that calls it keeps a copy of its own, and the section grows by as many.
#[doc(hidden)]
#[proc_macro_attribute]
pub fn call_path(attr: TokenStream, item: TokenStream) -> TokenStream {
    in_section(attr, item, "call_path")
}

/// Internal to clusterman: puts a generic function that a served call runs through (an
/// instance per remote function, or per argument and result type) into a section of its
/// own, so that a call's instances share a page or two rather than lying wherever the
/// linker put the user's code, each a page the call's TLB-cold path must walk to.
#[doc(hidden)]
#[proc_macro_attribute]
pub fn remote_path(attr: TokenStream, item: TokenStream) -> TokenStream {
    in_section(attr, item, "remote_path")
}

/// `item` in the executable's section `clusterman_<name>` (on Linux); `#[<name>]` takes no
/// arguments.
fn in_section(attr: TokenStream, item: TokenStream, name: &str) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(proc_macro2::TokenStream::from(attr).span(), format!("#[{name}] takes no arguments")).to_compile_error().into();
    }
    let section = format!("clusterman_{name}");
    let item = proc_macro2::TokenStream::from(item);
    quote!(#[cfg_attr(target_os = "linux", unsafe(link_section = #section))] #item).into()
}
